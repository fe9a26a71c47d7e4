"""Exact per-token KL(pi || pi_ref) over the whole vocabulary, in one pass over both logits.

    z = x / T, w = y / T, p = softmax(z), q = softmax(w), d_v = z_v - w_v
    KL = sum_v p_v (log p_v - log q_v) = E_p[d] - (lse(z) - lse(w))
       = c - (Mx - My) / T - log(Sx / Sy),   c = E_p[d] = sum_v exp((x_v - Mx) / T) d_v / Sx
    (Mx, My row maxima of x, y; Sx = sum_v exp((x_v - Mx) / T), Sy likewise)

    dKL/dx_v = p_v ((log p_v - log q_v) - KL) / T = p_v (d_v - c) / T;  y is a constant.

Writing the KL with (Mx - My) and log(Sx / Sy) instead of lse(z) - lse(w) keeps close
policies accurate: for flat rows log S ~ 9 has an fp32 ulp of 1e-6, and log Sx - log Sy
was off by 4e-7 to 7e-7 on a KL of 5e-7, the ratio by ~1e-7 (test_close_flat_policies).

The forward reads x and y once each with online rescaling (running Mx, Sx, My, Sy and the
running p-weighted sum of d) and keeps (Mx, log Sx, c), 16 bytes a row (c in fp64), for
the backward, which reads x and y again and writes dx in x's dtype.

-inf logits: where x_v = -inf the term is 0 (p_v = 0, whatever y_v); where only y_v = -inf
the KL is +inf (q_v = 0 < p_v), and the gradient is +inf (sign of g) on those entries and
finite elsewhere; a row whose x are all -inf has KL 0 and a zero gradient. Entries with
g p_v = 0 (p_v = 0, underflow included, or g = 0) get gradient 0, not 0 * inf = NaN, so a
masked-out token (g = 0) of an infinite-KL row leaves no NaN behind. KL is clamped at 0:
a KL of 1e-11 under 1e-7 of rounding comes out negative otherwise.
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._dispatch import use_triton
from .token_logprobs import (_CHUNK_ELEMS, _FLOATS, _check_float, _check_temperature, _round_bf16,
                             _round_to_bf16, _row_stats, _rowsum)

__all__ = ["full_kl", "full_kl_ref"]

_NINF = float("-inf")


@triton.jit
def _full_kl_fwd_kernel(
    # pointers
    x_ptr, y_ptr, kl_ptr, max_ptr, logsum_ptr, c_ptr,
    # sizes
    V,
    # strides (the vocabulary dim is contiguous)
    stride_x, stride_y,
    # meta-parameters
    inv_t,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # row * stride passes 2**31 (V = 151936: row 14134)
    mx = float("-inf")
    sx = 0.0
    my = float("-inf")
    sy = 0.0
    # running sum of exp((x - mx) / T) * (x - y), rescaled with sx, in fp64 (see c below)
    t = tl.full([], 0.0, tl.float64)
    n_inf = 0.0  # entries with y = -inf < x: KL = +inf
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=float("-inf")).to(tl.float32)
        mx_new = tl.maximum(mx, tl.max(x, axis=0))
        my_new = tl.maximum(my, tl.max(y, axis=0))
        # shift by 0 while everything seen is -inf: exp(-inf - -inf) would be NaN
        mx_safe = tl.where(mx_new == float("-inf"), 0.0, mx_new)
        my_safe = tl.where(my_new == float("-inf"), 0.0, my_new)
        alpha = tl.exp((mx - mx_safe) * inv_t)
        ex = tl.exp((x - mx_safe) * inv_t)
        sx = sx * alpha + tl.sum(ex, axis=0)
        live = (x > float("-inf")) & (y > float("-inf"))
        d = x.to(tl.float64) - y.to(tl.float64)  # exact: no rounding of x - y
        t = t * alpha.to(tl.float64) + tl.sum(tl.where(live, ex.to(tl.float64) * d, 0.0),
                                              axis=0)
        sy = sy * tl.exp((my - my_safe) * inv_t) + tl.sum(tl.exp((y - my_safe) * inv_t), axis=0)
        n_inf += tl.sum(((x > float("-inf")) & (y == float("-inf"))).to(tl.float32), axis=0)
        mx = mx_new
        my = my_new
    dead = sx == 0.0  # all x -inf: KL 0
    # c and the KL in fp64: c = E_p[d] is ~30 at KL ~ 10 (T = 0.7, logits of std 4), where
    # an fp32 ulp is 2e-6, and the backward's d - c and the KL's c - (Mx - My) / T cancel
    # down from there; in fp32 the gradient's error was 3.8x the fp32 reference's
    # (test_matches_reference, V = 1000). ~6 fp64 ops an element here and in the backward:
    # within A100/H100/B200 fp64 rates (9.7-67 TFLOP/s) at ~1e12 elements/s of bandwidth.
    c = tl.where(dead, 0.0, t / sx * inv_t)
    kl = c - (mx.to(tl.float64) - my.to(tl.float64)) * inv_t - tl.log(sx / sy).to(tl.float64)
    kl = tl.maximum(kl.to(tl.float32), 0.0)
    kl = tl.where(n_inf > 0, float("inf"), kl)
    kl = tl.where(dead, 0.0, kl)
    tl.store(kl_ptr + row, kl)
    tl.store(max_ptr + row, mx)
    tl.store(logsum_ptr + row, tl.log(sx))
    tl.store(c_ptr + row, c)


@triton.jit
def _full_kl_bwd_kernel(
    # pointers
    x_ptr, y_ptr, max_ptr, logsum_ptr, c_ptr, dkl_ptr, dx_ptr,
    # sizes
    V,
    # strides
    stride_x, stride_y, stride_dx,
    # meta-parameters
    inv_t,
    BLOCK_V: tl.constexpr,
    ROUND_BF16: tl.constexpr,  # interpreter only: see token_logprobs._round_to_bf16
):
    row = tl.program_id(0).to(tl.int64)
    mx = tl.load(max_ptr + row)
    log_s = tl.load(logsum_ptr + row)
    c = tl.load(c_ptr + row)
    g = tl.load(dkl_ptr + row) * inv_t
    dead = log_s == float("-inf")  # all x -inf: p = 0 everywhere
    mx = tl.where(dead, 0.0, mx)
    log_s = tl.where(dead, 0.0, log_s)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.load(y_ptr + row * stride_y + offs, mask=mask, other=float("-inf")).to(tl.float32)
        pg = g * tl.exp((x - mx) * inv_t - log_s)
        d_c = (x.to(tl.float64) - y.to(tl.float64)) * inv_t - c  # fp64: see the forward
        dx = tl.where(pg == 0.0, 0.0, pg * d_c.to(tl.float32))
        if ROUND_BF16:
            dx = _round_to_bf16(dx)
        tl.store(dx_ptr + row * stride_dx + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _launch_config(elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) from the two dtypes alone (elem_bytes: x's + y's), so the
    compile gate's cases reach every configuration: the largest power of two (tl.arange
    needs one) with <= 16 KB of x and y together per loop step -- 4096 for bf16 + bf16 (38
    steps at V = 151936), 2048 for fp32 + fp32 and for a 16/32-bit pair (16384 // 6 = 2730
    compiled for no GPU: the gate caught it); 8 warps = 256 threads x 8-16 of each."""
    return 1 << (16384 // elem_bytes).bit_length() - 1, 8


def _fwd_triton(x: torch.Tensor, y: torch.Tensor, inv_t: float):
    N, V = x.shape
    kl, m, log_s = (torch.empty(N, device=x.device, dtype=torch.float32) for _ in range(3))
    c = torch.empty(N, device=x.device, dtype=torch.float64)
    if N:
        block, warps = _launch_config(x.element_size() + y.element_size())
        _full_kl_fwd_kernel[(N,)](x, y, kl, m, log_s, c, V, x.stride(0), y.stride(0), inv_t,
                                  BLOCK_V=block, num_warps=warps)
    return kl, m, log_s, c


def _bwd_triton(x, y, m, log_s, c, g, inv_t):
    N, V = x.shape
    dx = torch.empty((N, V), device=x.device, dtype=x.dtype)
    if N:
        block, warps = _launch_config(x.element_size() + y.element_size())
        _full_kl_bwd_kernel[(N,)](x, y, m, log_s, c, g, dx, V, x.stride(0), y.stride(0),
                                  dx.stride(0), inv_t, BLOCK_V=block,
                                  ROUND_BF16=_round_bf16(dx), num_warps=warps)
    return dx


def _gate_cases():
    """Every launch the launchers above make on a GPU (each pair of logits dtypes; a
    16-divisible and an odd vocabulary), on meta tensors (no data), for the compile gate
    (bench/compile_gate.py)."""
    for dx, dy, V in itertools.product(_FLOATS, _FLOATS, (151936, 50257)):
        x = torch.empty(4096, V, dtype=dx, device="meta")
        y = torch.empty(4096, V, dtype=dy, device="meta")
        f = torch.empty(4096, device="meta")
        c = torch.empty(4096, dtype=torch.float64, device="meta")
        yield functools.partial(_fwd_triton, x, y, 1.0)
        yield functools.partial(_bwd_triton, x, y, f, f, c, f, 1.0)


def full_kl_ref(logits: torch.Tensor, ref_logits: torch.Tensor,
                temperature: float = 1.0) -> torch.Tensor:
    """The specification and test oracle, in the inputs' dtype (fp64 in the tests):
    sum_v p_v (log p_v - log q_v) with terms where p_v = 0 set to 0, +inf where
    q_v = 0 < p_v, 0 for a row whose logits are all -inf; ref_logits is a constant."""
    dead_p = (logits == _NINF).all(-1, keepdim=True)
    dead_q = (ref_logits == _NINF).all(-1, keepdim=True)
    lp = torch.log_softmax(logits.masked_fill(dead_p, 0) / temperature, -1)
    lq = torch.log_softmax(ref_logits.detach().masked_fill(dead_q, 0) / temperature, -1)
    lq = lq.masked_fill(dead_q, _NINF)
    zero = lp == _NINF  # p_v = 0: term 0; masked_fill also stops the NaN gradient of 0 * inf
    lp = lp.masked_fill(zero, 0)
    term = (lp.exp() * (lp - lq.masked_fill(zero, 0))).masked_fill(zero, 0)
    return term.sum(-1).masked_fill(dead_p.squeeze(-1), 0)


def _fwd_torch(x: torch.Tensor, y: torch.Tensor, inv_t: float):
    N, V = x.shape
    kl, m, log_s = (torch.empty(N, device=x.device, dtype=torch.float32) for _ in range(3))
    c = torch.empty(N, device=x.device, dtype=torch.float64)
    # fp32 temporaries of 16 MB live: x, y (copies unless fp32), ex, ey; 32 MB for x - y
    # in fp64 (exact: as in the kernel, c and the KL are fp64)
    step = max(1, _CHUNK_ELEMS // 2 // V)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        xc, yc = x[rows].float(), y[rows].float()
        mx, _, ex = _row_stats(xc, inv_t)
        my, _, ey = _row_stats(yc, inv_t)
        sx, sy = _rowsum(ex), _rowsum(ey)
        live = (xc > _NINF) & (yc > _NINF)
        d = (xc.double() - yc.double()).mul_(ex).masked_fill_(~live, 0)
        cc = _rowsum(d) / sx * inv_t
        del d
        inf_kl = ((xc > _NINF) & (yc == _NINF)).any(-1)  # q_v = 0 < p_v somewhere
        dead = sx == 0
        cc = cc.masked_fill_(dead, 0)
        mx, my = mx.squeeze(1), my.squeeze(1)
        kl_c = (cc - (mx.double() - my.double()) * inv_t - (sx / sy).log_()).float()
        kl_c = kl_c.clamp_(min=0)
        kl[rows] = kl_c.masked_fill_(inf_kl, float("inf")).masked_fill_(dead, 0)
        m[rows], log_s[rows], c[rows] = mx, sx.log(), cc
    return kl, m, log_s, c


def _bwd_torch(x, y, m, log_s, c, g, inv_t):
    N, V = x.shape
    dx = torch.empty((N, V), device=x.device, dtype=x.dtype)
    dead = log_s == _NINF
    m, log_s, g = m.masked_fill(dead, 0), log_s.masked_fill(dead, 0), g * inv_t
    step = max(1, _CHUNK_ELEMS // 2 // V)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        xc, yc = x[rows].float(), y[rows].float()
        pg = (xc - m[rows, None]).mul_(inv_t).sub_(log_s[rows, None]).exp_().mul_(g[rows, None])
        d_c = (xc.double() - yc.double()).mul_(inv_t).sub_(c[rows, None]).float()
        dx[rows] = d_c.mul_(pg).masked_fill_(pg == 0, 0)
    return dx


class _FullKL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, y, inv_t, on_triton):
        kl, m, log_s, c = (_fwd_triton if on_triton else _fwd_torch)(x, y, inv_t)
        ctx.save_for_backward(x, y, m, log_s, c)  # the logits themselves, no copies
        ctx.inv_t, ctx.on_triton = inv_t, on_triton
        return kl

    @staticmethod
    @once_differentiable  # the backward reads the logits again, outside autograd
    def backward(ctx, g):
        x, y, m, log_s, c = ctx.saved_tensors
        bwd = _bwd_triton if ctx.on_triton else _bwd_torch
        return bwd(x, y, m, log_s, c, g.float().contiguous(), ctx.inv_t), None, None, None


def full_kl(logits: torch.Tensor, ref_logits: torch.Tensor, *,
            temperature: float = 1.0) -> torch.Tensor:
    """KL(softmax(logits / T) || softmax(ref_logits / T)) per token, fp32 of shape
    logits.shape[:-1].

    logits, ref_logits: [..., V] of the same shape, each float32/bfloat16/float16 (they may
    differ). Differentiable in logits only: dKL/dlogits_v = g p_v ((log p_v - log q_v) - KL)
    / T, in the logits' dtype; ref_logits gets no gradient. Triton for CUDA tensors, a
    chunked PyTorch path for CPU tensors (SCORE_FAST_BACKEND overrides, see _dispatch)."""
    _check_float("logits", logits)
    _check_float("ref_logits", ref_logits)
    if logits.shape != ref_logits.shape:
        raise ValueError(f"ref_logits shape {tuple(ref_logits.shape)} must equal logits shape "
                         f"{tuple(logits.shape)}")
    if ref_logits.device != logits.device:
        raise ValueError(f"ref_logits are on {ref_logits.device} but logits on {logits.device}")
    inv_t = _check_temperature(temperature)
    V = logits.shape[-1]
    x, y = logits.reshape(-1, V), ref_logits.detach().reshape(-1, V)
    x = x if x.stride(-1) == 1 else x.contiguous()
    y = y if y.stride(-1) == 1 else y.contiguous()
    kl = _FullKL.apply(x, y, inv_t, use_triton(logits, ref_logits))
    return kl.view(logits.shape[:-1])

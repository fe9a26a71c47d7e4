"""Log-probability of the chosen token, without materialising the log-softmax.

    logp[n] = log softmax(x[n] / T)[t[n]] = (x[n, t] - M[n]) / T - log S[n],
    M[n] = max_v x[n, v],  S[n] = sum_v exp((x[n, v] - M[n]) / T)

    dlogp/dx[n, v] = (onehot(t[n])_v - p[n, v]) / T,  p[n, v] = exp((x[n, v] - M[n]) / T - log S[n])

A policy-gradient step needs one number per token, but `log_softmax(logits).gather(...)`
writes an fp32 [N, V] tensor first: N = 8192, V = 151936 is 5 GB for 8192 numbers. Here the
forward reads the logits once with an online log-sum-exp and keeps (M, log S), 8 bytes a
row; the backward reads them again and writes dlogits in the logits' dtype.

Edge cases (all deliberate): -inf logits are a masked vocabulary (p = 0); a row whose logits
are all -inf gives logp = -inf and a zero gradient; a target whose logit is -inf gives -inf
with the finite gradient g * (onehot - p) / T; logp is clamped at 0 (S >= 1 keeps it <= 0
up to rounding). Each row is computed alone with a fixed block size, so a token's result does not
depend on the other rows of the batch (bitwise).
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl
from torch.autograd.function import once_differentiable

from ._common import FLOATS, check_targets, check_temperature, store_dtype
from ._dispatch import checks_enabled, use_triton

__all__ = ["token_logprobs", "token_logprobs_ref"]

# The PyTorch path works on row chunks of <= 2**23 fp32 elements (32 MB a temporary, two
# temporaries live), so it never holds an fp32 copy of all logits (5 GB at 8192 x 151936).
_CHUNK_ELEMS = 2**23


@triton.jit
def _token_logprobs_fwd_kernel(
    # pointers
    logits_ptr, targets_ptr, logp_ptr, max_ptr, logsum_ptr,
    # sizes
    V,
    # strides (the vocabulary dim is contiguous)
    stride_row,
    # meta-parameters
    inv_t,
    BLOCK_V: tl.constexpr,
):
    # int64: at V = 151936, row * stride passes 2**31 from row 14134 on
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + row * stride_row
    m = float("-inf")  # running max of raw logits
    s = 0.0  # running sum of exp((x - m) / T)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(row_ptr + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=0))
        # while everything seen is -inf, shift by 0: exp(-inf - -inf) would be NaN
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp((m - m_safe) * inv_t) + tl.sum(tl.exp((x - m_safe) * inv_t), axis=0)
        m = m_new
    log_s = tl.log(s)  # -inf for an all -inf row
    x_t = tl.load(row_ptr + tl.load(targets_ptr + row)).to(tl.float32)
    # (x_t - M) / T - log S, not x_t / T - lse: at |x| = 1e4 an fp32 lse has an ulp of 1e-3
    logp = tl.minimum((x_t - m) * inv_t - log_s, 0.0)
    logp = tl.where(x_t == float("-inf"), float("-inf"), logp)
    tl.store(logp_ptr + row, logp)
    tl.store(max_ptr + row, m)
    tl.store(logsum_ptr + row, log_s)


@triton.jit
def _token_logprobs_bwd_kernel(
    # pointers
    logits_ptr, targets_ptr, max_ptr, logsum_ptr, dlogp_ptr, dlogits_ptr,
    # sizes
    V,
    # strides
    stride_row, stride_drow,
    # meta-parameters
    inv_t,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(max_ptr + row)
    log_s = tl.load(logsum_ptr + row)
    dead = log_s == float("-inf")  # all logits -inf: zero gradient, onehot included
    g = tl.where(dead, 0.0, tl.load(dlogp_ptr + row) * inv_t)
    m = tl.where(dead, 0.0, m)
    log_s = tl.where(dead, 0.0, log_s)
    t = tl.load(targets_ptr + row)
    for start in range(0, V, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(logits_ptr + row * stride_row + offs, mask=mask, other=float("-inf"))
        p = tl.exp((x.to(tl.float32) - m) * inv_t - log_s)
        dx = g * (tl.where(offs == t, 1.0, 0.0) - p)
        tl.store(dlogits_ptr + row * stride_drow + offs, dx.to(dlogits_ptr.dtype.element_ty),
                 mask=mask)


def _launch_config(elem_bytes: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) from the logits' dtype alone, so the compile gate's cases (one
    per dtype) reach every configuration: 16 KB of logits per loop step, the tail masked --
    BLOCK_V 8192 for bf16/fp16 (19 steps at V = 151936), 4096 for fp32; 8 warps = 256
    threads x 32 bf16 each, four 16-byte loads a thread."""
    return 16384 // elem_bytes, 8


def _gate_cases():
    """Every launch the launchers below make on a GPU (each dtype; a 16-divisible and an
    odd vocabulary, which Triton specialises differently), on meta tensors (no data), for
    the compile gate (bench/compile_gate.py)."""
    for dtype, V in itertools.product(FLOATS, (151936, 50257)):
        x = torch.empty(4096, V, dtype=dtype, device="meta")
        t = torch.empty(4096, dtype=torch.int64, device="meta")
        f = torch.empty(4096, device="meta")
        yield functools.partial(_logprobs_fwd_triton, x, t, 1.0)
        yield functools.partial(_logprobs_bwd_triton, x, t, f, f, f, 1.0)


def _logprobs_fwd_triton(x: torch.Tensor, t: torch.Tensor, inv_t: float):
    N, V = x.shape
    logp, m, log_s = (torch.empty(N, device=x.device, dtype=torch.float32) for _ in range(3))
    if N:
        block, warps = _launch_config(x.element_size())
        _token_logprobs_fwd_kernel[(N,)](x, t, logp, m, log_s, V, x.stride(0), inv_t,
                                         BLOCK_V=block, num_warps=warps)
    return logp, m, log_s


def _logprobs_bwd_triton(x, t, m, log_s, g, inv_t):
    N, V = x.shape
    dx = torch.empty((N, V), device=x.device, dtype=store_dtype(x.dtype))
    if N:
        block, warps = _launch_config(x.element_size())
        _token_logprobs_bwd_kernel[(N,)](x, t, m, log_s, g, dx, V, x.stride(0), dx.stride(0),
                                         inv_t, BLOCK_V=block, num_warps=warps)
    return dx.to(x.dtype)


def _rowsum(a: torch.Tensor) -> torch.Tensor:
    """a.sum(-1) with a per-row order that does not depend on the row count. ATen splits a
    reduction with a single output across threads (a different summation order: at
    V = 151936 a lone row's sum differs in the last bit), so a lone row is summed as two
    identical rows (a stride-0 view, no copy)."""
    if a.shape[0] == 1:
        return a.expand(2, -1).sum(-1)[:1]
    return a.sum(-1)


def _logprobs_fwd_torch(x: torch.Tensor, t: torch.Tensor, inv_t: float):
    N, V = x.shape
    logp, m, log_s = (torch.empty(N, device=x.device, dtype=torch.float32) for _ in range(3))
    step = max(1, _CHUNK_ELEMS // V)
    for r in range(0, N, step):
        xc = x[r:r + step].float()  # a copy for bf16/fp16, a view for fp32
        mc = xc.amax(-1, keepdim=True)
        m_safe = mc.masked_fill(mc == float("-inf"), 0)
        ls = _rowsum((xc - m_safe).mul_(inv_t).exp_()).log_()
        x_t = xc.gather(1, t[r:r + step, None]).squeeze(1)
        lp = ((x_t - m_safe.squeeze(1)) * inv_t - ls).clamp_(max=0)
        logp[r:r + step] = lp.masked_fill_(x_t == float("-inf"), float("-inf"))
        m[r:r + step] = mc.squeeze(1)
        log_s[r:r + step] = ls
    return logp, m, log_s


def _logprobs_bwd_torch(x, t, m, log_s, g, inv_t):
    N, V = x.shape
    dx = torch.empty((N, V), device=x.device, dtype=x.dtype)
    dead = log_s == float("-inf")
    g = (g * inv_t).masked_fill_(dead, 0)
    m = m.masked_fill(dead, 0)
    log_s = log_s.masked_fill(dead, 0)
    step = max(1, _CHUNK_ELEMS // V)
    for r in range(0, N, step):
        rows = slice(r, r + step)
        p = (x[rows].float() - m[rows, None]).mul_(inv_t).sub_(log_s[rows, None]).exp_()
        d = p.mul_(-g[rows, None]).scatter_add_(1, t[rows, None], g[rows, None])
        dx[rows] = d
    return dx


class _TokenLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, t, inv_t, on_triton):
        fwd = _logprobs_fwd_triton if on_triton else _logprobs_fwd_torch
        logp, m, log_s = fwd(x, t, inv_t)
        ctx.save_for_backward(x, t, m, log_s)  # the logits themselves, no copy
        ctx.inv_t, ctx.on_triton = inv_t, on_triton
        return logp

    @staticmethod
    @once_differentiable  # the backward reads the logits again, outside autograd
    def backward(ctx, g):
        x, t, m, log_s = ctx.saved_tensors
        bwd = _logprobs_bwd_triton if ctx.on_triton else _logprobs_bwd_torch
        return bwd(x, t, m, log_s, g.float().contiguous(), ctx.inv_t), None, None, None


def _check_float(name: str, a: torch.Tensor) -> None:
    if not isinstance(a, torch.Tensor) or a.dtype not in FLOATS:
        raise ValueError(f"{name} must be a float32, bfloat16 or float16 tensor, "
                         f"got {getattr(a, 'dtype', type(a).__name__)}")
    if a.dim() < 1 or a.shape[-1] < 1:
        raise ValueError(f"{name} needs a vocabulary dim of size >= 1, got shape "
                         f"{tuple(a.shape)}")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, *,
                   temperature: float = 1.0) -> torch.Tensor:
    """log_softmax(logits / temperature)[..., targets] as fp32 of shape targets.shape.

    logits: [..., V] float32/bfloat16/float16; targets: integer [...] = logits.shape[:-1],
    values in [0, V). Differentiable in logits: dlogits = g * (onehot(targets) - p) / T with
    p = softmax(logits / T), in the logits' dtype. Triton for CUDA tensors, a chunked
    PyTorch path for CPU tensors (SCORE_FAST_BACKEND overrides, see _dispatch)."""
    _check_float("logits", logits)
    check_targets(targets, "logits", logits)
    if targets.device != logits.device:
        raise ValueError(f"targets are on {targets.device} but logits on {logits.device}")
    inv_t = check_temperature(temperature)
    V = logits.shape[-1]
    if checks_enabled() and ((targets < 0) | (targets >= V)).any().item():  # one sync
        raise ValueError(f"targets must lie in [0, {V}) (logits shape {tuple(logits.shape)}), "
                         f"got min {targets.min().item()} max {targets.max().item()}")
    x = logits.reshape(-1, V)
    if x.stride(-1) != 1:
        x = x.contiguous()
    t = targets.reshape(-1).to(torch.int64).contiguous()
    logp = _TokenLogprobs.apply(x, t, inv_t, use_triton(logits, targets))
    return logp.view(targets.shape)


def token_logprobs_ref(logits: torch.Tensor, targets: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """The specification and test oracle, in the logits' dtype (fp64 in the tests):
    log_softmax(logits / T).gather(targets), with an all -inf row giving -inf and a zero
    gradient (log_softmax alone gives NaN there)."""
    dead = (logits == float("-inf")).all(-1, keepdim=True)
    logp = torch.log_softmax(logits.masked_fill(dead, 0) / temperature, -1)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1).masked_fill(dead.squeeze(-1),
                                                                          float("-inf"))

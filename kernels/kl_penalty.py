"""Per-token KL penalty KL(pi || pi_ref) estimated from the sampled tokens.

With d = logp - ref_logp for the token the policy sampled (Schulman's estimators,
http://joschu.net/blog/kl-approx.html):

    k1 = d                              dk1/dlogp = 1
    k2 = d^2 / 2                        dk2/dlogp = d
    k3 = exp(-d) - 1 + d                dk3/dlogp = 1 - exp(-d)
       = exp(ref - logp) - (ref - logp) - 1

As estimates of the VALUE of KL(pi || pi_ref) with y ~ pi: k1 is unbiased but can go
negative; k3 is unbiased and >= 0 (the default here); k2 is biased, >= 0.
As a LOSS term (what score_loss does with them) their expected gradients differ from what
the value suggests: E_pi[k'(d) grad log pi] is 0 for k1, grad KL(pi || pi_ref) for k2 and
grad KL(pi_ref || pi) -- the reverse KL -- for k3. The paper's per-token KL(pi || pi_ref) in
a loss is k2 (score_fast.config.KL_ESTIMATORS; tests/test_kl_estimators.py checks all three
exactly on a categorical).
ref_logp is a constant: it gets no gradient. Math and output are fp32 whatever the input
dtype; the gradient comes back in logp's dtype. No clamp: k3 overflows to inf in fp32
once d < -88.7 (exp(88.7) ~ fp32 max), which the fp64 reference does not.

score_loss uses kl_and_grad (the Triton helper its kernel calls) and kl_and_grad_torch
(its PyTorch twin).

    from score_fast.kernels.kl_penalty import kl_penalty
    kl = kl_penalty(logp, ref_logp, kind="k3")   # same shape as logp, fp32
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton

__all__ = ["kl_penalty", "kl_penalty_ref", "KL_KINDS"]

KL_KINDS = ("k1", "k2", "k3")


@triton.jit
def _exp(x):
    """exp in fp32 to ~1 ulp on every backend, from fp32 multiplies and adds alone. tl.exp
    compiles to ex2.approx(x * log2(e)) on NVIDIA GPUs: the product rounds with an error of
    |x| * 6e-8 in the exponent, 1e-3 absolute on exp(7) ~ 1100, 7x torch's error (seen on
    an H200 in test_gpu_matches_reference[k3]), and even after range reduction ex2.approx
    itself is ~2 ulp, still 2.2x torch's error there. So (Cody-Waite): x = k ln2 + r with
    |r| <= ln2 / 2 and ln2 in two parts, so that k * LN2_HI is exact for |k| < 2^11; exp(r)
    by its Taylor series through r^8 (the first term dropped, r^9 / 9!, is 2e-10 relative);
    2^k built exactly from its bits, in two factors so that k down to -150 still gives the
    denormals torch gives. The interpreter lacks libdevice.exp, which would serve too."""
    xc = tl.minimum(tl.maximum(x, -104.0), 89.0)  # exp(89) = inf, exp(-104) = 0 in fp32
    k = tl.floor(xc * 1.4426950408889634 + 0.5)
    r = xc - k * 0.693145751953125  # LN2_HI: 17 significant bits
    r = r - k * 1.4286068203094172e-06  # LN2_LO = ln 2 - LN2_HI
    p = 1.0 / 40320.0
    p = 1.0 / 5040.0 + r * p
    p = 1.0 / 720.0 + r * p
    p = 1.0 / 120.0 + r * p
    p = 1.0 / 24.0 + r * p
    p = 1.0 / 6.0 + r * p
    p = 0.5 + r * p
    p = 1.0 + r * p
    p = 1.0 + r * p
    k1 = (k * 0.5).to(tl.int32)
    k2 = k.to(tl.int32) - k1
    s1 = ((k1 + 127) << 23).to(tl.float32, bitcast=True)
    s2 = ((k2 + 127) << 23).to(tl.float32, bitcast=True)
    return tl.where(x == x, p * s1 * s2, x)  # NaN stays NaN


@triton.jit
def kl_and_grad(d, KIND: tl.constexpr):
    """(KL_KIND(d), dKL/dd) in fp32 for a block of d = logp - ref_logp."""
    if KIND == "k1":
        return d, tl.zeros_like(d) + 1.0
    elif KIND == "k2":
        return 0.5 * d * d, d
    else:
        # exp(-d) - 1 + d loses everything to cancellation when d is small: at d = 1e-3
        # the value is 5e-7 but exp(-d) - 1 rounds with an absolute error of ~6e-8 (half
        # an ulp of 1.0), a 10% error. Below |d| = 0.5 a Taylor series is used instead
        # (at 0.5 the direct form is within 6e-8 / 0.11 ~ 5e-7 relative, ~4 ulp): dropping
        # the terms from d^10 on costs at most 2 * 0.5^8 / 10! ~ 2e-9 relative.
        # libdevice.expm1 would serve, but the CPU interpreter (triton 3.9) lacks it.
        # k3 = sum_{n>=2} (-d)^n / n!,  1 - exp(-d) = sum_{n>=1} -(-d)^n / n!
        small = tl.abs(d) < 0.5
        ds = tl.where(small, d, 0.0)
        s = 1.0 / 362880.0
        s = 1.0 / 40320.0 - ds * s
        s = 1.0 / 5040.0 - ds * s
        s = 1.0 / 720.0 - ds * s
        s = 1.0 / 120.0 - ds * s
        s = 1.0 / 24.0 - ds * s
        s = 1.0 / 6.0 - ds * s
        s = 0.5 - ds * s  # s = k3 / d^2 (series through d^9)
        e = _exp(-d)
        kl = tl.where(small, ds * ds * s, e - 1.0 + d)
        # 1 - exp(-d) = d * (1 - d/2 + d^2/6 - ...): same cancellation, same cure
        g = 1.0 / 3628800.0
        g = 1.0 / 362880.0 - ds * g
        g = 1.0 / 40320.0 - ds * g
        g = 1.0 / 5040.0 - ds * g
        g = 1.0 / 720.0 - ds * g
        g = 1.0 / 120.0 - ds * g
        g = 1.0 / 24.0 - ds * g
        g = 1.0 / 6.0 - ds * g
        g = 0.5 - ds * g
        g = 1.0 - ds * g  # g = (1 - exp(-d)) / d (series through d^9)
        grad = tl.where(small, ds * g, 1.0 - e)
        return kl, grad


@triton.jit
def _kl_fwd_kernel(
    # pointers
    logp_ptr, ref_ptr, out_ptr,
    # sizes
    n,
    # meta-parameters
    KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # n may pass 2^31
    mask = offs < n
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    kl, _ = kl_and_grad(logp - ref, KIND)
    tl.store(out_ptr + offs, kl, mask=mask)


@triton.jit
def _kl_bwd_kernel(
    # pointers
    logp_ptr, ref_ptr, dout_ptr, dlogp_ptr,
    # sizes
    n,
    # meta-parameters
    KIND: tl.constexpr, BLOCK: tl.constexpr,
):
    # recomputes d instead of saving dKL/dlogp: one fp32 tensor less kept between passes
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    logp = tl.load(logp_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    dout = tl.load(dout_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    _, grad = kl_and_grad(logp - ref, KIND)
    tl.store(dlogp_ptr + offs, (dout * grad).to(dlogp_ptr.dtype.element_ty), mask=mask)


_BLOCK = 1024  # elementwise: 1024 fp32 per program, 4 warps -> 8 elements per thread


def _gate_cases():
    """Every launch the launchers below make on a GPU, on meta tensors (no data), for the
    compile gate (bench/compile_gate.py)."""
    x = torch.empty(8192, dtype=torch.bfloat16, device="meta")
    for kind in KL_KINDS:
        yield functools.partial(_kl_fwd_triton, x, x, kind)
        yield functools.partial(_kl_bwd_triton, x, x, x, kind)


# The kernels see fp32 only (the math is fp32 anyway): one compiled variant per KIND, not one
# per pair of input dtypes; the copies are of [T] vectors (32 KB at T = 8192).
def _kl_fwd_triton(logp: torch.Tensor, ref: torch.Tensor, kind: str) -> torch.Tensor:
    out = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    n = logp.numel()
    if n:
        _kl_fwd_kernel[(triton.cdiv(n, _BLOCK),)](logp.float(), ref.float(), out, n,
                                                  KIND=kind, BLOCK=_BLOCK)
    return out


def _kl_bwd_triton(logp, ref, dout, kind):
    dlogp = torch.empty(logp.shape, dtype=torch.float32, device=logp.device)
    n = logp.numel()
    if n:
        _kl_bwd_kernel[(triton.cdiv(n, _BLOCK),)](logp.float(), ref.float(), dout.float(),
                                                  dlogp, n, KIND=kind, BLOCK=_BLOCK)
    return dlogp.to(logp.dtype)


def kl_and_grad_torch(d: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(KL_kind, dKL/dlogp) from d = logp - ref_logp in d's dtype (expm1: no cancellation)."""
    if kind == "k1":
        return d, torch.ones_like(d)
    if kind == "k2":
        return 0.5 * d * d, d
    em1 = torch.expm1(-d)
    return em1 + d, -em1


class _KLPenalty(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, ref, kind, triton_path):
        ctx.save_for_backward(logp, ref)
        ctx.kind, ctx.triton_path = kind, triton_path
        if triton_path:
            return _kl_fwd_triton(logp, ref, kind)
        return kl_and_grad_torch(logp.float() - ref.float(), kind)[0]

    @staticmethod
    def backward(ctx, dout):
        logp, ref = ctx.saved_tensors
        if ctx.triton_path:
            dlogp = _kl_bwd_triton(logp, ref, dout.contiguous(), ctx.kind)
        else:
            dkl = kl_and_grad_torch(logp.float() - ref.float(), ctx.kind)[1]
            dlogp = (dout * dkl).to(logp.dtype)
        return dlogp, None, None, None


def check_kind(kind: str) -> None:
    if kind not in KL_KINDS:
        raise ValueError(f"kind must be one of {KL_KINDS}, got {kind!r}")


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate, fp32, shape of logp; gradient flows to logp only.

    logp, ref_logp: log-probs of the sampled tokens under the policy and the reference
    (same shape, any float dtype). kind: "k1", "k2" or "k3" (formulas in the module doc).
    """
    check_kind(kind)
    if ref_logp.shape != logp.shape:
        raise ValueError(f"ref_logp shape {tuple(ref_logp.shape)} does not match "
                         f"logp shape {tuple(logp.shape)}")
    if not logp.is_floating_point() or not ref_logp.is_floating_point():
        raise ValueError(f"logp and ref_logp must be floating point, got {logp.dtype} "
                         f"and {ref_logp.dtype}")
    triton_path = use_triton(logp, ref_logp)
    shape = logp.shape
    logp_flat = logp.contiguous().view(-1)
    ref_flat = ref_logp.detach().contiguous().view(-1)
    return _KLPenalty.apply(logp_flat, ref_flat, kind, triton_path).view(shape)


def kl_penalty_ref(logp: torch.Tensor, ref_logp: torch.Tensor, kind: str = "k3") -> torch.Tensor:
    """Plain-torch specification in logp's dtype (fp64-capable); autograd gives the gradient."""
    return kl_and_grad_torch(logp - ref_logp.detach(), kind)[0]

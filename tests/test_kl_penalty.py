import math

import pytest
import torch
import triton
import triton.language as tl
from conftest import assert_within_rule

from score_fast.kernels.kl_penalty import _exp, kl_penalty, kl_penalty_ref

KINDS = ("k1", "k2", "k3")


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SCORE_FAST_BACKEND", request.param)
    return request.param


def _inputs(shape, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    n = math.prod(shape)
    logp = -5 * torch.rand(n, generator=g)
    # d from 1e-6 to ~3 in size, both signs: the series branch (|d| < 0.5) and exp branch
    d = torch.randn(n, generator=g) * torch.logspace(-6, 0.5, n) if n > 1 else torch.tensor([0.3])
    ref = logp - d
    return logp.view(shape).to(device), ref.view(shape).to(device)


def _check_against_ref(logp, ref, kind, seed=0):
    dout = torch.randn(logp.shape, generator=torch.Generator().manual_seed(seed + 1))
    x = logp.clone().requires_grad_()
    out = kl_penalty(x, ref, kind)
    out.backward(dout.to(out.device))
    assert out.dtype == torch.float32 and out.shape == logp.shape

    x64 = logp.double().cpu().requires_grad_()
    ref64 = kl_penalty_ref(x64, ref.double().cpu(), kind)
    ref64.backward(dout.double())
    x32 = logp.cpu().clone().requires_grad_()
    base = kl_penalty_ref(x32, ref.cpu(), kind)
    base.backward(dout)
    assert_within_rule(out, ref64, base, atol=1e-7, name=f"{kind} value")
    assert_within_rule(x.grad, x64.grad, x32.grad, atol=1e-7, name=f"{kind} grad")


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shape", [(1,), (37,), (4099,), (3, 5, 7)])
def test_matches_reference(backend, kind, shape):
    logp, ref = _inputs(shape)
    _check_against_ref(logp, ref, kind)


@pytest.mark.parametrize("kind,value,grad", [
    ("k1", 1.0, 1.0),
    ("k2", 0.5, 1.0),
    ("k3", math.exp(-1.0), 1.0 - math.exp(-1.0)),  # e^-1 - 1 + 1; 1 - e^-1
])
def test_hand_values_at_d_equal_one(backend, kind, value, grad):
    logp = torch.tensor([-1.0, -2.5], requires_grad=True)
    out = kl_penalty(logp, logp.detach() - 1.0, kind)
    out.sum().backward()
    torch.testing.assert_close(out, torch.full((2,), value), rtol=1e-6, atol=0)
    torch.testing.assert_close(logp.grad, torch.full((2,), grad), rtol=1e-6, atol=0)


def test_k3_small_d_relative_accuracy(monkeypatch):
    # k3 ~ d^2/2: the direct exp(-d) - 1 + d in fp32 is ~6e-8 off in absolute terms, i.e.
    # 100% wrong at d = 3e-4; the kernel must keep a few ulp relative error. (The torch
    # path, expm1(-d) + d, is only ~1e-7 / |d| relative: as good as the fp32 reference.)
    monkeypatch.setenv("SCORE_FAST_BACKEND", "triton")
    d = torch.logspace(-4, -0.4, 200) * torch.tensor([1.0, -1.0]).repeat(100)
    ref = torch.full_like(d, -1.0)
    logp = (ref.double() + d.double()).float()
    d64 = logp.double() - ref.double()
    x = logp.clone().requires_grad_()
    out = kl_penalty(x, ref, "k3")
    out.sum().backward()
    rel = ((out.double() - (torch.expm1(-d64) + d64)) / (torch.expm1(-d64) + d64)).abs().max()
    assert rel < 2e-6
    g64 = -torch.expm1(-d64)
    assert ((x.grad.double() - g64) / g64).abs().max() < 2e-6


def test_half_precision_input(backend):
    logp, ref = _inputs((37,))
    x = logp.bfloat16().requires_grad_()
    out = kl_penalty(x, ref.bfloat16(), "k3")
    out.sum().backward()
    assert out.dtype == torch.float32 and x.grad.dtype == torch.bfloat16
    torch.testing.assert_close(out, kl_penalty_ref(x.detach().float(), ref.bfloat16().float()))


def test_no_grad_to_ref(backend):
    logp, ref = _inputs((37,))
    ref.requires_grad_()
    x = logp.requires_grad_()
    kl_penalty(x, ref).sum().backward()
    assert ref.grad is None and x.grad is not None


def test_empty(backend):
    x = torch.empty(0, 3, requires_grad=True)
    out = kl_penalty(x, torch.empty(0, 3))
    out.sum().backward()
    assert out.shape == (0, 3) and x.grad.shape == (0, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_reference_gradcheck(kind):
    logp, ref = _inputs((9,), seed=3)
    x = logp.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: kl_penalty_ref(t, ref.double(), kind), (x,))


def test_errors():
    logp = torch.zeros(4)
    with pytest.raises(ValueError, match="kind"):
        kl_penalty(logp, logp, "k4")
    with pytest.raises(ValueError, match=r"ref_logp shape \(3,\).*logp shape \(4,\)"):
        kl_penalty(logp, torch.zeros(3))
    with pytest.raises(ValueError, match="floating"):
        kl_penalty(torch.zeros(4, dtype=torch.long), logp)


@triton.jit
def _exp_kernel(x_ptr, o_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m = offs < n
    tl.store(o_ptr + offs, _exp(tl.load(x_ptr + offs, mask=m)), mask=m)


def _run_exp(x):
    out = torch.empty_like(x)
    _exp_kernel[(triton.cdiv(x.numel(), 1024),)](x, out, x.numel(), BLOCK=1024)
    return out


def _check_exp(device):
    """The kernels' exp (range reduction, exact 2^k) against fp64 over fp32's whole range:
    within 2 ulp (~0.8 measured; torch.exp: 0.5), the same inf / 0 / NaN at the ends."""
    x = torch.cat([torch.linspace(-110, 95, 40_001), torch.randn(10_000) * 30,
                   torch.tensor([0.0, -0.0, 1e-30, 88.72, 88.73, -87.4, -103.9, -104.5,
                                 float("inf"), -float("inf"), float("nan")])]).to(device)
    out = _run_exp(x).cpu().double()
    ref = x.cpu().double().exp().float().double()  # fp64 exp, then fp32's range
    x = x.cpu()
    assert torch.equal(out.isnan(), ref.isnan()) and torch.equal(out.isinf(), ref.isinf())
    normal = ref.isfinite() & (ref.abs() >= torch.finfo(torch.float32).tiny)
    rel = ((out - x.double().exp()) / x.double().exp())[normal].abs().max().item()
    assert rel <= 2 * torch.finfo(torch.float32).eps, rel
    sub = ref.isfinite() & ~normal  # denormals: an absolute error of a few 2^-149
    assert (out - ref)[sub].abs().max().item() <= 8 * 2.0**-149


def test_exp_accuracy(monkeypatch):
    _check_exp("cpu")


@pytest.mark.gpu
def test_gpu_exp_accuracy():
    _check_exp("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("kind", KINDS)
def test_gpu_matches_reference(monkeypatch, kind):
    monkeypatch.setenv("SCORE_FAST_BACKEND", "triton")
    logp, ref = _inputs((8, 4099), device="cuda")
    _check_against_ref(logp, ref, kind)

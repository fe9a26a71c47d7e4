"""full_kl: the Triton kernels (interpreted on CPU here, compiled in the `gpu` tests) and
the chunked PyTorch path, each against the fp64 reference under the project's rule
(conftest.assert_within_rule): max error <= 2 x plain PyTorch's at the same dtype + atol.
The baseline is full_kl_ref run at the inputs' own dtype: plain PyTorch ops, and unlike
log_softmax-and-sum it has a gradient (not NaN) on rows with -inf logits."""
import pytest
import torch
from conftest import assert_within_rule

import score_fast.kernels.full_kl as fkl
from score_fast.kernels.full_kl import full_kl, full_kl_ref

# The interpreter evaluates exp(-inf - -inf) and log(0) in lanes that tl.where discards.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
NINF, INF = float("-inf"), float("inf")


def atol(ref):
    """4 fp32 ulps of the largest finite reference value (at least of 1.0): the final fp32
    rounding, which torch can happen to dodge on a small case. KL runs from 1e-6 (close
    policies) to ~60 (independent logits), so a fixed atol would be either loose for the
    first or tight for the second: 4.8e-7 vs 2.9e-5."""
    finite = ref[torch.isfinite(ref)]
    return 4 * 2**-23 * max(1.0, finite.abs().max().item() if finite.numel() else 0.0)


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SCORE_FAST_BACKEND", request.param)
    return request.param


def ours(x, y, T, g):
    x = x.detach().clone().requires_grad_()
    out = full_kl(x, y, temperature=T)
    out.backward(g)
    return out.detach(), x.grad


def ref_at(dtype, x, y, T, g):
    """The reference at `dtype`: fp64 is the oracle, the inputs' dtype the rule's baseline."""
    x = x.detach().to(dtype).requires_grad_()
    out = full_kl_ref(x, y.to(dtype) if dtype == torch.float64 else y, T)
    out.backward(g.to(out.dtype))
    return out.detach(), x.grad


def check(x, y, T, rows=slice(None), g=None):
    """Forward and gradient (random upstream g) within the rule on `rows`."""
    g = torch.randn(x.shape[:-1]) if g is None else g
    out, grad = ours(x, y, T, g)
    assert out.dtype == torch.float32 and out.shape == x.shape[:-1]
    assert grad.dtype == x.dtype and grad.shape == x.shape
    r_out, r_grad = ref_at(torch.float64, x, y, T, g)
    b_out, b_grad = ref_at(x.dtype, x, y, T, g)
    assert_within_rule(out[rows], r_out[rows], b_out[rows], atol(r_out[rows]), "kl")
    assert_within_rule(grad[rows], r_grad[rows], b_grad[rows], atol(r_grad[rows]), "dlogits")
    return out, grad


@pytest.mark.parametrize("T, noise", [(1.0, 1e-3), (0.7, 0.1), (0.7, None)])
@pytest.mark.parametrize("N, V", [(1, 32001), (4, 1), (5, 7), (6, 100), (3, 1000),
                                  (4, 32001), (3, 50257), (2, 151936)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, dtype, N, V, T, noise):
    """ref_logits = logits + noise: a reference policy near the policy (KL ~ 1e-6 and 1e-2,
    the cancellation-prone case); noise None: independent logits (KL ~ 10)."""
    torch.manual_seed(N * V)
    x = torch.randn(N, V) * 4
    y = torch.randn(N, V) * 4 if noise is None else x + noise * torch.randn(N, V)
    check(x.to(dtype), y.to(dtype), T)


@pytest.mark.parametrize("V", [1000, 32001])
def test_close_flat_policies(backend, V):
    """KL ~ 5e-7 between flat distributions (log S ~ 9): (Mx - My) / T + log(Sx / Sy) keeps
    the error at ~1e-7 where log Sx - log Sy (fp32 ulp 1e-6 at 9) gives 4e-7 to 7e-7."""
    torch.manual_seed(V)
    x = torch.randn(4, V) * 0.5
    y = x + 1e-3 * torch.randn(4, V)
    g = torch.randn(4)
    out = ours(x, y, 1.0, g)[0]
    assert (out.double() - ref_at(torch.float64, x, y, 1.0, g)[0]).abs().max() < 2.5e-7


@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_and_masked_logits(backend, dtype, T):
    # V = 9000: 5 loop steps at fp32's BLOCK_V 2048, 3 at bf16's 4096
    torch.manual_seed(1)
    N, V = 9, 9000
    x = torch.randn(N, V) * 4
    y = x + torch.randn(N, V)
    x[0, ::97], x[0, 5::101] = 1e4, -1e4  # large logits of both signs, in both
    y[0, ::89], y[0, 7::103] = 1e4, -1e4
    masked = torch.rand(V) < 0.9
    x[1, masked], y[1, masked] = NINF, NINF  # a shared masked vocabulary: terms 0
    x[2, ::3] = NINF  # p = 0 where q > 0: terms 0
    x[3] = NINF  # no policy mass at all: KL 0, gradient 0
    y[4, 17] = NINF  # q = 0 < p at one entry: KL +inf
    x[5], y[5] = NINF, NINF
    y[6] = NINF
    x[7, :8500], y[7, :8500] = NINF, NINF  # the first steps see only -inf
    x[8, :8500] = NINF
    g = torch.randn(N)
    g[6] = 0  # a masked-out token with an infinite KL
    out, grad = check(x.to(dtype), y.to(dtype), T, rows=[0, 1, 2, 7, 8], g=g)
    assert not out.isnan().any() and (out >= 0).all()
    assert out[3] == 0 and out[5] == 0 and out[4] == INF and out[6] == INF
    assert not grad.isnan().any()
    assert (grad[3] == 0).all() and (grad[5] == 0).all() and (grad[6] == 0).all()
    # d KL / d x_v = +inf (times sign g) where q_v = 0 < p_v; finite elsewhere
    assert grad[4, 17] == INF * g[4].sign()
    assert torch.isfinite(grad[4, :17]).all() and torch.isfinite(grad[4, 18:]).all()


def test_infinite_kl_row_gradient(backend):
    x = torch.zeros(1, 300, requires_grad=True)
    y = torch.zeros(1, 300)
    y[0, 0] = NINF
    out = full_kl(x, y)
    (-out).sum().backward()  # g = -1
    assert out.item() == INF
    assert x.grad[0, 0] == NINF and torch.isfinite(x.grad[0, 1:]).all()


def test_identical_inputs_give_zero(backend):
    x = torch.randn(3, 5000) * 4
    x[1, ::2] = NINF
    x.requires_grad_()
    out = full_kl(x, x.detach(), temperature=0.7)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3))
    assert torch.equal(x.grad, torch.zeros_like(x))  # p (d - c) = p (0 - 0)
    # KL ~ 1e-11 under ~1e-7 of rounding: negative before the clamp at 0
    near = full_kl(x.detach(), x.detach() + 1e-5 * torch.randn(3, 5000))
    assert (near >= 0).all() and near.max() < 1e-6


@pytest.mark.parametrize("shape", [(0, 50), (2, 0, 50)])
def test_zero_rows(backend, shape):
    x = torch.randn(shape, requires_grad=True)
    out = full_kl(x, torch.randn(shape))
    assert out.shape == shape[:-1] and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, V", [(2, 151936), (6, 50257), (7, 1000)])
def test_batch_split_invariance(backend, dtype, N, V):
    """A token's KL and gradient do not depend on the rows beside it (bitwise); N = 2 has
    lone-row halves, which ATen reduces with another summation order unless guarded."""
    torch.manual_seed(V)
    x = (torch.randn(N, V) * 4).to(dtype)
    y = (torch.randn(N, V) * 4).to(dtype)
    g = torch.randn(N)
    out, grad = ours(x, y, 1.0, g)
    h = N // 2
    out_a, grad_a = ours(x[:h], y[:h], 1.0, g[:h])
    out_b, grad_b = ours(x[h:], y[h:], 1.0, g[h:])
    assert torch.equal(out, torch.cat([out_a, out_b]))
    assert torch.equal(grad, torch.cat([grad_a, grad_b]))


@pytest.mark.parametrize("N", [7, 8])
def test_torch_path_chunks_agree_bitwise(monkeypatch, N):
    """Row chunks of 3 (N = 7 leaves a lone last row) give the bits of one chunk."""
    monkeypatch.setenv("SCORE_FAST_BACKEND", "torch")
    torch.manual_seed(N)
    V = 70000
    x, y, g = torch.randn(N, V) * 4, torch.randn(N, V) * 4, torch.randn(N)
    whole = ours(x, y, 0.7, g)
    monkeypatch.setattr(fkl, "_CHUNK_ELEMS", 6 * V)  # halved inside: 3 rows
    chunked = ours(x, y, 0.7, g)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_leading_dims_strides_and_mixed_dtypes(backend):
    torch.manual_seed(2)
    B, S, V = 2, 3, 1000
    padded = torch.randn(B, S, V + 24) * 4
    transposed = (torch.randn(B, V, S) * 4).transpose(1, 2)  # vocabulary dim not contiguous
    check(padded[..., :V], transposed, 0.7)  # row strides V + 24 and (after a copy) V
    check(transposed, padded[..., :V], 1.0)
    x2 = (torch.randn(V, 5) * 4).t()  # reshape keeps a stride-5 vocabulary dim
    check(x2, x2.flip(0), 0.7)
    check(padded[..., :V].to(torch.bfloat16), padded[..., 1:V + 1], 1.0)  # bf16 vs fp32


@pytest.mark.parametrize("dx,dy", [(torch.bfloat16, torch.float32),
                                   (torch.float32, torch.float16)])
def test_mixed_dtypes_large_vocabulary(backend, dx, dy):
    """A 16/32-bit pair past one 2048-column block (V = 5000, 3 loop steps): its block was
    16384 // 6 = 2730 columns, no power of two, which neither the interpreter nor a GPU
    compiles (found by the compile gate)."""
    torch.manual_seed(3)
    x = torch.randn(4, 5000) * 4
    check(x.to(dx), (x + torch.randn(4, 5000)).to(dy), 0.9)


def test_ref_logits_get_no_gradient(backend):
    x = torch.randn(3, 50, requires_grad=True)
    y = torch.randn(3, 50, requires_grad=True)
    full_kl(x, y).sum().backward()
    assert x.grad is not None and y.grad is None


def _bad_inputs():
    x, y = torch.randn(2, 3, 7), torch.randn(2, 3, 7)
    return [
        ("int-logits", x.long(), y, {}, r"logits must be a float32.*torch\.int64"),
        ("fp64-logits", x.double(), y, {}, r"logits must be a float32.*float64"),
        ("int-ref", x, y.int(), {}, r"ref_logits must be a float32.*torch\.int32"),
        ("list-ref", x, y.tolist(), {}, r"ref_logits must be"),
        ("empty-vocab", torch.randn(2, 0), torch.randn(2, 0), {},
         r"logits needs a vocabulary dim.*\(2, 0\)"),
        ("shape", x, y[..., :6], {}, r"ref_logits shape \(2, 3, 6\) must equal logits shape "
                                     r"\(2, 3, 7\)"),
        ("device", x, y.to("meta"), {}, r"ref_logits are on meta but logits on cpu"),
        ("temperature-0", x, y, {"temperature": 0.0}, r"temperature must be .* > 0, got 0\.0"),
        ("temperature-inf", x, y, {"temperature": INF}, r"temperature"),
        ("temperature-none", x, y, {"temperature": None}, r"temperature"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises_value_error(backend, case):
    _, x, y, kwargs, msg = case
    with pytest.raises(ValueError, match=msg):
        full_kl(x, y, **kwargs)


def test_reference_gradcheck():
    torch.manual_seed(3)
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    y = torch.randn(3, 2, 5, dtype=torch.float64)
    x[0, 1, 2] = NINF  # p = 0: term and gradient 0
    x[1, 0, 3] = y[1, 0, 3] = NINF
    x.requires_grad_()
    assert torch.autograd.gradcheck(lambda a: full_kl_ref(a, y, 0.7), (x,))


def test_reference_is_the_kl():
    """The oracle itself: sum p (log p - log q), from probabilities, on plain inputs."""
    torch.manual_seed(4)
    x, y = torch.randn(4, 30, dtype=torch.float64), torch.randn(4, 30, dtype=torch.float64)
    p, q = torch.softmax(x / 0.7, -1), torch.softmax(y / 0.7, -1)
    torch.testing.assert_close(full_kl_ref(x, y, 0.7), (p * (p / q).log()).sum(-1))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_compiled(monkeypatch, dtype):
    monkeypatch.setenv("SCORE_FAST_BACKEND", "triton")
    torch.manual_seed(0)
    N, V = 64, 151936
    x = torch.randn(N, V, device="cuda") * 4
    y = x + torch.randn(N, V, device="cuda")
    x[0, ::7] = NINF  # p = 0 there
    x[1], y[1] = NINF, NINF
    x, y = x.to(dtype), y.to(dtype)
    g = torch.randn(N, device="cuda")
    out, grad = ours(x, y, 0.7, g)
    r_out, r_grad = ref_at(torch.float64, x, y, 0.7, g)
    b_out, b_grad = ref_at(dtype, x, y, 0.7, g)
    assert out[1] == 0 and (grad[1] == 0).all() and torch.isfinite(grad).all()
    assert_within_rule(out, r_out, b_out, atol(r_out), "kl")
    assert_within_rule(grad, r_grad, b_grad, atol(r_grad), "dlogits")
    out_a, grad_a = ours(x[:N // 2], y[:N // 2], 0.7, g[:N // 2])
    assert torch.equal(out[:N // 2], out_a) and torch.equal(grad[:N // 2], grad_a)


@pytest.mark.gpu
def test_gpu_offsets_past_int32(monkeypatch):
    """Rows past 2**31 / V = 14134 address elements beyond int32 (2 x 4.3 GB of bf16)."""
    monkeypatch.setenv("SCORE_FAST_BACKEND", "triton")
    torch.manual_seed(0)
    N, V = 14200, 151936
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).mul_(4)
    y = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).mul_(4)
    g = torch.randn(N, device="cuda")
    out, grad = ours(x, y, 1.0, g)
    tail = slice(N - 4, N)
    r_out, r_grad = ref_at(torch.float64, x[tail], y[tail], 1.0, g[tail])
    b_out, b_grad = ref_at(torch.bfloat16, x[tail], y[tail], 1.0, g[tail])
    assert_within_rule(out[tail], r_out, b_out, atol(r_out), "kl")
    assert_within_rule(grad[tail], r_grad, b_grad, atol(r_grad), "dlogits")

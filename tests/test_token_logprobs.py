"""token_logprobs: the Triton kernels (interpreted on CPU here, compiled in the `gpu` tests)
and the chunked PyTorch path, each against the fp64 reference under the project's rule
(conftest.assert_within_rule): max error <= 2 x plain PyTorch's at the same dtype + atol."""
import math

import pytest
import torch
from conftest import assert_within_rule

import score_fast.kernels.token_logprobs as tlp
from score_fast.kernels.token_logprobs import token_logprobs, token_logprobs_ref

# The interpreter evaluates exp(-inf - -inf) and log(0) in lanes that tl.where discards.
pytestmark = [pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning"),
              pytest.mark.filterwarnings("ignore:divide by zero encountered:RuntimeWarning")]

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# logp: an fp32 log-sum-exp over up to 151936 terms, summed in another order than torch's,
# is off by up to ~2e-6 (measured); torch itself can land within 1e-7 on a given case.
ATOL_LOGP = 1e-5
# dlogits: fp32 p = exp((x - M) / T - log S) vs torch's exp(log_softmax) differ by ~3e-7.
ATOL_GRAD = 1e-6
NINF = float("-inf")


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch):
    monkeypatch.setenv("SCORE_FAST_BACKEND", request.param)
    return request.param


def ours(logits, targets, T, g):
    x = logits.detach().clone().requires_grad_()
    out = token_logprobs(x, targets, temperature=T)
    out.backward(g)
    return out.detach(), x.grad


def ref64(logits, targets, T, g):
    x = logits.detach().double().requires_grad_()
    out = token_logprobs_ref(x, targets, T)
    out.backward(g.double())
    return out.detach(), x.grad


def plain_torch(logits, targets, T, g):
    """The rule's baseline: plain PyTorch at the logits' own dtype."""
    x = logits.detach().clone().requires_grad_()
    out = torch.log_softmax(x / T, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    out.backward(g.to(x.dtype))
    return out.detach(), x.grad


def check(logits, targets, T, rows=slice(None)):
    """Forward and gradient (random upstream g) within the rule on `rows`."""
    g = torch.randn(targets.shape)
    out, grad = ours(logits, targets, T, g)
    assert out.dtype == torch.float32 and out.shape == targets.shape
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    r_out, r_grad = ref64(logits, targets, T, g)
    b_out, b_grad = plain_torch(logits, targets, T, g)
    assert_within_rule(out[rows], r_out[rows], b_out[rows], ATOL_LOGP, "logp")
    assert_within_rule(grad[rows], r_grad[rows], b_grad[rows], ATOL_GRAD, "dlogits")
    return out, grad


@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("N, V", [(1, 32001), (4, 1), (5, 7), (6, 100), (3, 1000),
                                  (4, 32001), (3, 50257), (2, 151936)])
@pytest.mark.parametrize("dtype", DTYPES)
def test_matches_reference(backend, dtype, N, V, T):
    torch.manual_seed(N * V)
    logits = (torch.randn(N, V) * 4).to(dtype)
    check(logits, torch.randint(0, V, (N,)), T)


@pytest.mark.parametrize("T", [1.0, 0.7])
@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_and_masked_logits(backend, dtype, T):
    # V = 9000: 3 loop steps at fp32's BLOCK_V 4096, 2 at bf16's 8192
    torch.manual_seed(1)
    N, V = 6, 9000
    x = torch.randn(N, V) * 4
    x[0, ::97], x[0, 5::101] = 1e4, -1e4  # large logits of both signs
    x[1, torch.rand(V) < 0.9] = NINF  # a masked vocabulary
    x[2, :8500] = NINF  # the first steps see only -inf: the running max starts at -inf
    x[3] = NINF  # all masked
    x[5] = -1e4
    x[5, [3, 8999]] = 1e4  # a tie: logp = -log 2
    t = torch.tensor([97, 0, 8700, 4, 11, 3])
    t[1] = (x[1] > NINF).nonzero()[0, 0]
    x[4, 11] = NINF  # the target itself masked
    x = x.to(dtype)
    live = [0, 1, 2, 4, 5]
    out, grad = check(x, t, T, rows=live)
    assert not out.isnan().any() and (out <= 0).all()
    assert out[3] == NINF and out[4] == NINF
    assert torch.isfinite(grad).all()
    assert (grad[3] == 0).all()
    assert out[5].item() == pytest.approx(-math.log(2), abs=1e-6)


def test_all_masked_row_alone(backend):
    x = torch.full((1, 300), NINF, requires_grad=True)
    out = token_logprobs(x, torch.tensor([7]))
    out.sum().backward()
    assert out.item() == NINF and torch.equal(x.grad, torch.zeros_like(x))


@pytest.mark.parametrize("shape", [(0, 50), (2, 0, 50)])
def test_zero_rows(backend, shape):
    x = torch.randn(shape, requires_grad=True)
    out = token_logprobs(x, torch.zeros(shape[:-1], dtype=torch.long))
    assert out.shape == shape[:-1] and out.dtype == torch.float32
    out.sum().backward()
    assert x.grad.shape == shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N, V", [(2, 151936), (6, 50257), (7, 1000)])
def test_batch_split_invariance(backend, dtype, N, V):
    """A token's logp and gradient do not depend on the rows beside it (bitwise); N = 2 has
    lone-row halves, which ATen reduces with another summation order unless guarded."""
    torch.manual_seed(V)
    x = (torch.randn(N, V) * 4).to(dtype)
    t = torch.randint(0, V, (N,))
    g = torch.randn(N)
    out, grad = ours(x, t, 1.0, g)
    h = N // 2
    out_a, grad_a = ours(x[:h], t[:h], 1.0, g[:h])
    out_b, grad_b = ours(x[h:], t[h:], 1.0, g[h:])
    assert torch.equal(out, torch.cat([out_a, out_b]))
    assert torch.equal(grad, torch.cat([grad_a, grad_b]))


@pytest.mark.parametrize("N", [7, 8])
def test_torch_path_chunks_agree_bitwise(monkeypatch, N):
    """Row chunks of 3 (N = 7 leaves a lone last row) give the bits of one chunk."""
    monkeypatch.setenv("SCORE_FAST_BACKEND", "torch")
    torch.manual_seed(N)
    V = 70000
    x, t, g = torch.randn(N, V) * 4, torch.randint(0, V, (N,)), torch.randn(N)
    whole = ours(x, t, 0.7, g)
    monkeypatch.setattr(tlp, "_CHUNK_ELEMS", 3 * V)
    chunked = ours(x, t, 0.7, g)
    assert torch.equal(whole[0], chunked[0]) and torch.equal(whole[1], chunked[1])


def test_leading_dims_and_strides(backend):
    torch.manual_seed(2)
    B, S, V = 2, 3, 1000
    t = torch.randint(0, V, (B, S))
    padded = torch.randn(B, S, V + 24) * 4
    check(padded[..., :V], t, 0.7)  # row stride V + 24
    transposed = (torch.randn(B, V, S) * 4).transpose(1, 2)  # vocabulary dim not contiguous
    check(transposed, t, 1.0)
    check((torch.randn(V, 5) * 4).t(), t.flatten()[:5], 0.7)  # reshape keeps it a view
    check(padded[..., :V].to(torch.bfloat16), t.int(), 1.0)  # int32 targets


def _bad_inputs():
    x, t = torch.randn(2, 3, 7), torch.randint(0, 7, (2, 3))
    bad_t = t.clone()
    return [
        ("int-logits", x.long(), t, {}, r"logits must be a float32.*torch\.int64"),
        ("fp64-logits", x.double(), t, {}, r"logits must be a float32.*float64"),
        ("list-logits", x.tolist(), t, {}, r"logits must be"),
        ("scalar-logits", torch.tensor(1.0), torch.tensor(0), {}, r"logits needs a vocab"),
        ("empty-vocab", torch.randn(2, 0), torch.zeros(2, dtype=torch.long), {},
         r"logits needs a vocabulary dim.*\(2, 0\)"),
        ("float-targets", x, t.float(), {}, r"targets must be an integer"),
        ("bool-targets", x, t > 3, {}, r"targets must be an integer"),
        ("shape", x, t[:, :2], {},
         r"targets shape \(2, 2\) must equal logits\.shape\[:-1\] \(2, 3\)"),
        ("device", x, t.to("meta"), {}, r"targets are on meta but logits on cpu"),
        ("temperature-0", x, t, {"temperature": 0}, r"temperature must be .* > 0, got 0"),
        ("temperature-neg", x, t, {"temperature": -1.0}, r"temperature"),
        ("temperature-nan", x, t, {"temperature": float("nan")}, r"temperature"),
        ("temperature-str", x, t, {"temperature": "1"}, r"temperature"),
        ("target-neg", x, bad_t.index_put((torch.tensor(1), torch.tensor(2)), torch.tensor(-1)),
         {}, r"targets must lie in \[0, 7\).*min -1"),
        ("target-V", x, bad_t.index_put((torch.tensor(0), torch.tensor(0)), torch.tensor(7)),
         {}, r"targets must lie in \[0, 7\).*max 7"),
    ]


@pytest.mark.parametrize("case", _bad_inputs(), ids=lambda c: c[0])
def test_bad_input_raises_value_error(backend, case):
    _, logits, targets, kwargs, msg = case
    with pytest.raises(ValueError, match=msg):
        token_logprobs(logits, targets, **kwargs)


def test_value_check_can_be_switched_off(monkeypatch):
    """SCORE_FAST_CHECK_INPUTS=0 skips the (syncing) range check: torch's gather raises."""
    monkeypatch.setenv("SCORE_FAST_BACKEND", "torch")
    monkeypatch.setenv("SCORE_FAST_CHECK_INPUTS", "0")
    with pytest.raises(RuntimeError, match="out of bounds"):
        token_logprobs(torch.randn(2, 7), torch.tensor([0, 7]))


def test_reference_gradcheck():
    torch.manual_seed(3)
    x = torch.randn(3, 2, 5, dtype=torch.float64)
    x[0, 1, 2] = NINF  # a masked, non-target entry: its gradient is 0
    x.requires_grad_()
    t = torch.tensor([[0, 1], [4, 3], [2, 2]])
    assert torch.autograd.gradcheck(lambda a: token_logprobs_ref(a, t, 0.7), (x,))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_compiled(monkeypatch, dtype):
    monkeypatch.setenv("SCORE_FAST_BACKEND", "triton")
    torch.manual_seed(0)
    N, V = 64, 151936
    x = (torch.randn(N, V, device="cuda") * 4).to(dtype)
    x[0, ::7] = NINF
    x[1] = NINF
    t = torch.randint(0, V, (N,), device="cuda")
    t[0] = 1  # a live entry of row 0
    g = torch.randn(N, device="cuda")
    out, grad = ours(x, t, 0.7, g)
    r_out, r_grad = ref64(x, t, 0.7, g)
    b_out, b_grad = plain_torch(x, t, 0.7, g)
    assert out[1] == NINF and (grad[1] == 0).all() and torch.isfinite(grad).all()
    live = torch.arange(N, device="cuda") != 1
    assert_within_rule(out[live], r_out[live], b_out[live], ATOL_LOGP, "logp")
    assert_within_rule(grad[live], r_grad[live], b_grad[live], ATOL_GRAD, "dlogits")
    out_a, grad_a = ours(x[:N // 2], t[:N // 2], 0.7, g[:N // 2])
    assert torch.equal(out[:N // 2], out_a) and torch.equal(grad[:N // 2], grad_a)


@pytest.mark.gpu
def test_gpu_offsets_past_int32(monkeypatch):
    """Rows past 2**31 / V = 14134 address elements beyond int32 (4.3 GB of bf16 here)."""
    monkeypatch.setenv("SCORE_FAST_BACKEND", "triton")
    torch.manual_seed(0)
    N, V = 14200, 151936
    x = torch.randn(N, V, device="cuda", dtype=torch.bfloat16).mul_(4)
    t = torch.randint(0, V, (N,), device="cuda")
    g = torch.randn(N, device="cuda")
    out, grad = ours(x, t, 1.0, g)
    tail = slice(N - 4, N)
    r_out, r_grad = ref64(x[tail], t[tail], 1.0, g[tail])
    b_out, b_grad = plain_torch(x[tail], t[tail], 1.0, g[tail])
    assert_within_rule(out[tail], r_out, b_out, ATOL_LOGP, "logp")
    assert_within_rule(grad[tail], r_grad, b_grad, ATOL_GRAD, "dlogits")

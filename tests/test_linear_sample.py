"""linear_sample: exact in distribution (a chi-square goodness-of-fit test against the fp64
softmax probabilities, many draws, fixed seeds so the test is deterministic, and the same
test failing on a wrong distribution), greedy = argmax, masked and extreme logits, odd and
ragged vocabularies, every dtype, B = 1, reproducibility and input errors; on the PyTorch
path (with small vocabulary tiles so the tile-level Gumbel-max crosses many tiles) and on
the Triton path (interpreted here, compiled in the gpu tests)."""
import pytest
import torch

from helpers import chi_square_p
from score_fast.kernels import linear_sample as ls
from score_fast.kernels.linear_sample import linear_sample, linear_sample_ref

BACKENDS = ["torch", "triton"]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    """Select a path; the PyTorch one with 8-column tiles (V = 37 is 5 tiles, the last
    partial), so a sample is chosen across tiles in every test."""
    monkeypatch.setenv("SCORE_FAST_BACKEND", request.param)
    monkeypatch.setattr(ls, "_TILE_COLS", 8)
    return request.param


def _inputs(B, H, V, dtype=torch.float32, seed=0, scale=2.0, bias=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, H, generator=g)
    w = torch.randn(V, H, generator=g) * (scale / H**0.5)  # logits of std ~scale
    b = torch.randn(V, generator=g) if bias else None
    return h.to(dtype), w.to(dtype), None if b is None else b.to(dtype)


def _probs(h, w, b, temperature):
    """fp64 softmax of the logits the inputs (as given, in their dtype) define: [B, V]."""
    x = h.double() @ w.double().T
    if b is not None:
        x = x + b.double()
    return torch.softmax(x / temperature, -1)


def _draws(backend):
    return 20000 if backend == "torch" else 4096  # the interpreter runs each program in numpy


@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_distribution_matches_softmax(backend, temperature):
    """One hidden row repeated N times: N independent draws of one distribution. p > 1e-3
    at fixed seeds; the same samples against the softmax at twice the temperature (a
    plausible bug) are rejected at p < 1e-6, so the test can fail."""
    h, w, b = _inputs(1, 16, 37)
    n = _draws(backend)
    g = torch.Generator().manual_seed(1)
    tok = linear_sample(h.expand(n, -1), w, bias=b, temperature=temperature, generator=g)
    assert tok.shape == (n,) and tok.dtype == torch.int64
    p = _probs(h, w, b, temperature)[0]
    assert chi_square_p(tok, p) > 1e-3
    assert chi_square_p(tok, _probs(h, w, b, 2 * temperature)[0]) < 1e-6


def test_reference_is_the_multinomial_path():
    """The reference (softmax + multinomial, the path the op replaces) passes the same test:
    the test's statistics and probabilities are right, not only the op."""
    h, w, b = _inputs(1, 16, 37)
    g = torch.Generator().manual_seed(2)
    tok = linear_sample_ref(h.expand(20000, -1), w, b, 0.8, generator=g)
    assert chi_square_p(tok, _probs(h, w, b, 0.8)[0]) > 1e-3
    assert chi_square_p(tok, _probs(h, w, b, 1.6)[0]) < 1e-6


@pytest.mark.parametrize("dtype", DTYPES)
def test_extreme_and_masked_logits(backend, dtype):
    """hidden = 0: the logits are the bias. -inf entries are never drawn; entries at -1e4
    next to others at +1e4 get probability 0; the three near the top share the mass as
    softmax says, at every dtype (the values are exact in bf16: multiples of 64 at 1e4)."""
    V = 37
    b = torch.full((V,), float("-inf"))
    b[[3, 11, 36]] = torch.tensor([9984.0, 9984.0 - 1, 9984.0 + 0.5 if dtype == torch.float32
                                   else 9984.0 - 2])
    b[[0, 5, 20]] = -9984.0
    h = torch.zeros(1, 16, dtype=dtype)
    w = torch.randn(V, 16).to(dtype)
    b = b.to(dtype)
    n = _draws(backend)
    tok = linear_sample(h.expand(n, -1), w, bias=b, generator=torch.Generator().manual_seed(3))
    assert set(tok.unique().tolist()) <= {3, 11, 36}
    assert chi_square_p(tok, _probs(h, w, b, 1.0)[0]) > 1e-3


@pytest.mark.parametrize("dtype", DTYPES)
def test_greedy_is_argmax(backend, dtype):
    h, w, b = _inputs(5, 32, 300, dtype)
    x = h.float() @ w.float().T + b.float()
    out = linear_sample(h, w, bias=b, temperature=0.0)
    assert torch.equal(out, x.argmax(-1))
    assert torch.equal(linear_sample(h[:1], w, bias=b, temperature=0.0), x[:1].argmax(-1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("V", [50257, 32001])
def test_odd_vocabularies_ragged_tiles(monkeypatch, backend, dtype, V):
    """Full-size odd vocabularies (the last tile ragged on both paths; 4096-column tiles on
    the PyTorch path here) with only a few entries unmasked, the last one among them: every
    draw lands on them, in the proportions softmax gives."""
    monkeypatch.setattr(ls, "_TILE_COLS", 4096)
    h, w, _ = _inputs(1, 32, V, dtype, scale=0.5)
    allowed = torch.tensor([0, 4095, 4096, V // 2, V - 2, V - 1])
    b = torch.full((V,), float("-inf"))
    b[allowed] = 0.0
    b = b.to(dtype)
    n = 2000 if backend == "torch" else 64
    g = torch.Generator().manual_seed(4)
    tok = linear_sample(h.expand(n, -1), w, bias=b, temperature=0.7, generator=g)
    assert set(tok.unique().tolist()) <= set(allowed.tolist())
    if backend == "torch":
        assert chi_square_p(tok, _probs(h, w, b, 0.7)[0]) > 1e-3
        assert {V - 1, 0} <= set(tok.tolist())  # both ends of the vocabulary drawn


def test_batched_shapes_and_no_bias(backend):
    """hidden [2, 3, H] gives [2, 3] tokens, each from its own row's logits: row r is e_r
    and token hot[r] gets a logit 60 above the others in that row only."""
    _, w, _ = _inputs(1, 16, 37, bias=False)
    h = torch.eye(16)[:6]
    hot = torch.tensor([2, 30, 7, 8, 11, 36])
    w[hot, torch.arange(6)] += 60.0
    out = linear_sample(h.view(2, 3, 16), w, generator=torch.Generator().manual_seed(5))
    assert out.shape == (2, 3) and torch.equal(out.view(-1), hot)


def test_reproducible_with_generator(backend):
    h, w, b = _inputs(64, 16, 37)

    def go(seed):
        return linear_sample(h, w, bias=b, generator=torch.Generator().manual_seed(seed))

    assert torch.equal(go(7), go(7))
    assert not torch.equal(go(7), go(8))
    torch.manual_seed(9)
    a = linear_sample(h, w, bias=b)
    torch.manual_seed(9)
    assert torch.equal(a, linear_sample(h, w, bias=b))  # torch's global RNG


def test_bad_inputs_name_the_shapes():
    h, w, b = _inputs(4, 16, 37)
    with pytest.raises(ValueError, match=r"hidden shape \(4, 8\) and weight shape \(37, 16\)"):
        linear_sample(h[:, :8], w)
    with pytest.raises(ValueError, match=r"weight dtype torch.bfloat16 must equal hidden dtype "
                                         r"torch.float32 \(hidden shape \(4, 16\)"):
        linear_sample(h, w.bfloat16())
    with pytest.raises(ValueError, match=r"bias must have shape \(37,\).*got \(36,\)"):
        linear_sample(h, w, bias=b[:36])
    with pytest.raises(ValueError, match="weight must be"):
        linear_sample(h, w[0])
    with pytest.raises(ValueError, match="float32, bfloat16 or float16"):
        linear_sample(h.long(), w)
    with pytest.raises(ValueError, match="temperature"):
        linear_sample(h, w, temperature=-1.0)


def test_row_without_finite_logit_is_an_error(backend):
    h, w, _ = _inputs(3, 16, 37)
    b = torch.zeros(37)
    b[:] = float("-inf")
    with pytest.raises(ValueError, match=r"rows \[0, 1, 2\] \(of 3.*no finite logit"):
        linear_sample(h, w, bias=b)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_distribution_and_greedy(dtype):
    """Compiled kernel on a GPU: the chi-square test at a real vocabulary size (many splits)
    with the few allowed entries spread over it, and greedy = argmax of the fp32 logits."""
    V, H = 151936, 256
    h, w, _ = _inputs(1, H, V, dtype, scale=0.5)
    allowed = torch.tensor([0, 77, 40000, 100001, V - 1])
    b = torch.full((V,), float("-inf"))
    b[allowed] = 0.0
    h, w, b = h.cuda(), w.cuda(), b.to(dtype).cuda()
    n = 20000
    tok = linear_sample(h.expand(n, -1), w, bias=b, generator=torch.Generator("cuda")
                        .manual_seed(0))
    assert chi_square_p(tok.cpu(), _probs(h.cpu(), w.cpu(), b.cpu(), 1.0)[0]) > 1e-3
    hb, wb, bb = (a.cuda() for a in _inputs(64, H, V, dtype))
    x = hb.float() @ wb.float().T + bb.float()
    assert torch.equal(linear_sample(hb, wb, bias=bb, temperature=0), x.argmax(-1))

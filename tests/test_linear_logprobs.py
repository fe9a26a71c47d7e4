"""linear_logprobs against an fp64 reference (the full logits, then log_softmax + gather),
under the project's rule |out - ref64| <= 2 |torch_same_dtype - ref64| + atol, on the
PyTorch path and on the Triton path (interpreted here, compiled in the gpu tests)."""
import os
import sys

import pytest
import torch

from conftest import assert_within_rule
from score_fast.kernels import _lmhead as lm
from score_fast.kernels.linear_logprobs import linear_logprobs, linear_logprobs_ref

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
from harness import peak_memory  # noqa: E402

# torch: the PyTorch path; triton: the vocabulary-chunked path (torch matmuls -- cuBLAS on
# a GPU -- and the Triton elementwise kernels, interpreted here)
BACKENDS = ["torch", "triton"]
ATOL = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 1e-3}


def _use(backend, monkeypatch, cols=256):
    """Select a path; the Triton one runs with `cols`-column vocabulary chunks (256: V = 1000
    is 4 chunks, the last partial), so the online log-sum-exp crosses chunks in every test
    (the chunk rule, lm.chunk_cols, replaced for the test)."""
    monkeypatch.setenv("SCORE_FAST_BACKEND", backend)
    monkeypatch.setattr(lm, "chunk_cols", lambda n: cols)


def _inputs(N, H, V, dtype, bias=True, seed=0, device="cpu", scale=1.0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, H, generator=g)
    w = torch.randn(V, H, generator=g) * (scale / H**0.5) * 3  # logits of std ~3
    b = torch.randn(V, generator=g) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    up = torch.randn(N, generator=g)
    cast = lambda a: None if a is None else a.to(dtype).to(device)  # noqa: E731
    return cast(h), cast(w), cast(b), t.to(device), up.to(device)


def _leaf(a, dtype=None):
    return None if a is None else a.detach().to(dtype or a.dtype).requires_grad_(True)


def _run(fn, h, w, b, t, up, **kw):
    """Output and (dh, dw, db) for upstream gradient `up`."""
    h, w, b = _leaf(h), _leaf(w), _leaf(b)
    out = fn(h, w, t, bias=b, **kw) if fn is linear_logprobs else fn(h, w, t, b, **kw)
    out.float().backward(up.float())
    return out.detach(), [None if a is None else a.grad for a in (h, w, b)]


def _check_against_reference(h, w, b, t, up, temperature=1.0, atol=None):
    kw = dict(temperature=temperature)
    out, grads = _run(linear_logprobs, h, w, b, t, up, **kw)
    base, base_grads = _run(linear_logprobs_ref, h, w, b, t, up, **kw)
    ref, ref_grads = _run(linear_logprobs_ref, *(_leaf(a, torch.float64) for a in (h, w, b)),
                          t, up.double(), **kw)
    assert out.dtype == torch.float32 and out.shape == t.shape
    atol = ATOL[h.dtype] if atol is None else atol
    assert_within_rule(out, ref, base, atol, "logp")
    for name, gr, gb, g64 in zip(("dhidden", "dweight", "dbias"), grads, base_grads,
                                 ref_grads):
        if g64 is None:
            assert gr is None
            continue
        assert gr.dtype == h.dtype and gr.shape == g64.shape, name
        assert_within_rule(gr, g64, gb, atol, name)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,V,bias,temperature", [
    (1, 16, 100, True, 1.0), (37, 64, 1000, True, 0.7), (37, 16, 1000, False, 1.0),
    (20, 64, 100, False, 1.5)])
def test_matches_reference(backend, dtype, N, H, V, bias, temperature, monkeypatch):
    _use(backend, monkeypatch)
    _check_against_reference(*_inputs(N, H, V, dtype, bias), temperature=temperature)


def test_fp16_triton(monkeypatch):
    _use("triton", monkeypatch)
    _check_against_reference(*_inputs(19, 32, 300, torch.float16))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V", [32001, 50257, 151936])
def test_odd_vocabularies(backend, V, monkeypatch):
    _use(backend, monkeypatch, cols=8192)  # 4 to 19 chunks, the last partial
    h, w, b, t, up = _inputs(3, 16, V, torch.float32)
    t[0] = V - 1  # the last column of the last (partial) tile
    _check_against_reference(h, w, b, t, up, temperature=0.9)


@pytest.mark.parametrize("backend", BACKENDS)
def test_odd_vocabulary_bf16(backend, monkeypatch):
    _use(backend, monkeypatch, cols=8192)
    _check_against_reference(*_inputs(5, 16, 50257, torch.bfloat16))


@pytest.mark.parametrize("backend", BACKENDS)
def test_online_lse_across_vocab_chunks_cpu_and_tiles(backend, monkeypatch):
    """Several CPU vocabulary chunks (recompute instead of reuse) and several row chunks."""
    _use(backend, monkeypatch)
    monkeypatch.setattr(lm, "_TILE_ELEMS", lm._ROWS * 128)  # 1000 columns -> 8 chunks
    assert len(lm._vocab_chunks(1000)) == 8
    _check_against_reference(*_inputs(300 if backend == "torch" else 40, 16, 1000,
                                      torch.float32), temperature=0.8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_masked_vocabulary(backend, monkeypatch):
    """-inf bias entries are a masked vocabulary: p = 0 there, zero bias gradient there."""
    _use(backend, monkeypatch)
    h, w, b, t, up = _inputs(9, 16, 300, torch.float32)
    b[::3] = float("-inf")
    t = torch.where(t % 3 == 0, t + 1, t)
    out, (dh, dw, db) = _run(linear_logprobs, h, w, b, t, up)
    ref, (rh, rw, rb) = _run(linear_logprobs_ref, *(_leaf(a, torch.float64) for a in (h, w, b)),
                             t, up.double())
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(dh.double(), rh, atol=1e-5, rtol=0)
    torch.testing.assert_close(dw.double(), rw, atol=1e-5, rtol=0)
    assert torch.all(db[::3] == 0)
    torch.testing.assert_close(db.double(), rb.nan_to_num(0), atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_leading_dims_and_no_grad(backend, monkeypatch):
    _use(backend, monkeypatch)
    h, w, b, t, _ = _inputs(12, 16, 200, torch.float32)
    with torch.no_grad():
        out = linear_logprobs(h.view(3, 4, 16), w, t.view(3, 4), bias=b)
    assert out.shape == (3, 4) and out.dtype == torch.float32 and not out.requires_grad
    ref = linear_logprobs_ref(h.double(), w.double(), t, b.double())
    torch.testing.assert_close(out.view(-1).double(), ref, atol=1e-5, rtol=0)


def test_batch_split_invariance_cpu(monkeypatch):
    """Bitwise: a row's log-prob does not depend on which batch it came in (fixed-shape
    row chunks; 300 rows cross a 256-row chunk boundary)."""
    monkeypatch.setenv("SCORE_FAST_BACKEND", "torch")
    h, w, b, t, _ = _inputs(300, 64, 5000, torch.float32)
    full = linear_logprobs(h, w, t, bias=b)
    for cut in (150, 1, 299, 256):
        halves = torch.cat([linear_logprobs(h[:cut], w, t[:cut], bias=b),
                            linear_logprobs(h[cut:], w, t[cut:], bias=b)])
        assert torch.equal(full, halves), cut


def test_batch_split_triton(monkeypatch):
    """The Triton path makes no bitwise promise across batch splits: its GEMMs (cuBLAS on a
    GPU, BLAS here) pick kernels and summation orders by shape, and the chunk width follows
    the row count; a row's result agrees within rounding (what holds on every CPU and GPU).
    The PyTorch path's bitwise invariance is test_batch_split_invariance_cpu."""
    _use("triton", monkeypatch)
    h, w, b, t, _ = _inputs(37, 32, 700, torch.float32)
    full = linear_logprobs(h, w, t, bias=b)
    for cut in (16, 7):
        halves = torch.cat([linear_logprobs(h[:cut], w, t[:cut], bias=b),
                            linear_logprobs(h[cut:], w, t[cut:], bias=b)])
        torch.testing.assert_close(halves, full, atol=1e-5, rtol=0)


def test_no_logits_sized_allocation_cpu(monkeypatch):
    """Forward + backward peak RSS far below the N x V fp32 logits (512 MB at V = 65536),
    and flat in V: doubling V adds 256 MB of logits but only the larger [V, H] gradient
    (4 MB) here; the tiles are 256 x <=32768 fp32 whatever V is."""
    monkeypatch.setenv("SCORE_FAST_BACKEND", "torch")
    N, H = 2048, 32
    peaks = {}
    for V in (32768, 65536):
        h, w, b, t, up = _inputs(N, H, V, torch.float32)
        h.requires_grad_(True)
        w.requires_grad_(True)

        def step():
            linear_logprobs(h, w, t).backward(up)  # noqa: F821 (the loop's del)

        step()  # warm-up: allocator pools, first-call code paths
        h.grad = w.grad = None
        peaks[V] = peak_memory(step, "cpu")
        if peaks[V] < 0:
            pytest.skip("no /proc/self/clear_refs here")
        assert peaks[V] > V * H * 4  # the measurement sees at least the weight gradient
        del h, w, b, t, up
    logits = N * 65536 * 4
    assert peaks[65536] < logits / 4, (
        f"peak {peaks[65536] / 2**20:.0f} MiB vs logits {logits / 2**20:.0f} MiB")
    grown = peaks[65536] - peaks[32768]
    assert grown < N * 32768 * 4 / 8, f"peak grew {grown / 2**20:.0f} MiB with V"


def test_chunk_cols_rule():
    """[n, Vc] fp32 tile <= 256 MB, Vc in [1024, 16384], a multiple of 128."""
    assert lm.chunk_cols(8192) == 8192
    assert lm.chunk_cols(1) == 16384 and lm.chunk_cols(10**6) == 1024
    for n in (1, 3, 1000, 5000, 8192, 12345, 65536, 10**6):
        vc = lm.chunk_cols(n)
        assert vc % 128 == 0 and 1024 <= vc <= 16384
        assert n * vc * 4 <= 2**28 or vc == 1024


@pytest.mark.parametrize("bad, match", [
    (dict(hidden=torch.randn(4, 8)), r"hidden shape \(4, 8\).*weight shape \(50, 16\).*H"),
    (dict(weight=torch.randn(50)), r"weight must be \[V, H\].*\(50,\)"),
    (dict(weight=torch.randn(50, 16, dtype=torch.float64)), "weight must be a float32"),
    (dict(weight=torch.randn(50, 16).bfloat16()), r"weight dtype torch.bfloat16.*hidden"),
    (dict(bias=torch.randn(49)), r"bias must have shape \(50,\).*\(49,\)"),
    (dict(bias=torch.randn(50).bfloat16()), "bias dtype"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), r"targets shape \(5,\).*\(4,\)"),
    (dict(targets=torch.zeros(4)), "targets must be an integer"),
    (dict(targets=torch.full((4,), 50)), r"targets must lie in \[0, 50\)"),
    (dict(temperature=0.0), "temperature"),
])
def test_bad_input(bad, match):
    args = dict(hidden=torch.randn(4, 16), weight=torch.randn(50, 16),
                targets=torch.zeros(4, dtype=torch.long), bias=None, temperature=1.0)
    args.update(bad)
    with pytest.raises(ValueError, match=match):
        linear_logprobs(args["hidden"], args["weight"], args["targets"], bias=args["bias"],
                        temperature=args["temperature"])


@pytest.mark.gpu
@pytest.mark.parametrize("N,H,V", [(256, 512, 32000), (512, 2048, 151936)])
def test_gpu_bf16(N, H, V):
    h, w, b, t, up = _inputs(N, H, V, torch.bfloat16, device="cuda")
    _check_against_reference(h, w, b, t, up, temperature=0.9)


@pytest.mark.gpu
def test_gpu_fp32():
    _check_against_reference(*_inputs(128, 256, 32000, torch.float32, device="cuda"))


@pytest.mark.gpu
def test_gpu_several_chunks(monkeypatch):
    """Forced 1024-column chunks (32 at V = 32000, the last partial), bias, T != 1."""
    monkeypatch.setattr(lm, "chunk_cols", lambda n: 1024)
    _check_against_reference(*_inputs(300, 512, 32000, torch.bfloat16, device="cuda"),
                             temperature=0.8)

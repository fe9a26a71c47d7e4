"""score_fast.packing: the C++ and Python paths agree, the invariants hold, attention stays
inside each packed sequence, and bad input gets a ValueError that names it."""
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from score_fast import packing
from score_fast.packing import pack, plan_bins

BACKENDS = ["cpp", "python"]


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SCORE_FAST_PACKING", request.param)
    if request.param == "cpp" and packing._load_native() is None:
        pytest.skip("score_fast._C is not built")
    return request.param


def test_native_extension_is_built_when_required():
    # .ci/run sets SCORE_FAST_REQUIRE_NATIVE=1: there a missing extension is a failure, not
    # a silent fall back to the slow path.
    if os.environ.get("SCORE_FAST_REQUIRE_NATIVE") != "1":
        pytest.skip("SCORE_FAST_REQUIRE_NATIVE is not set")
    assert packing._load_native() is not None
    assert packing.backend() == "cpp"


def _both(fn):
    """Run fn under each backend and return the two results."""
    out = {}
    mp = pytest.MonkeyPatch()
    for name in BACKENDS:
        mp.setenv("SCORE_FAST_PACKING", name)
        out[name] = fn()
    mp.undo()
    return out["cpp"], out["python"]


def _batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.max_seqlen == y.max_seqlen
        for field in ("input_ids", "position_ids", "cu_seqlens", "seq_index", "segment_ids"):
            u, v = getattr(x, field), getattr(y, field)
            assert (u is None) == (v is None), field
            if u is not None:
                assert u.dtype == v.dtype and torch.equal(u, v), field


lengths_st = st.lists(st.integers(0, 64), max_size=60)


@pytest.mark.skipif(packing._load_native() is None, reason="score_fast._C is not built")
@settings(max_examples=150, deadline=None)
@given(lengths=lengths_st, budget=st.integers(64, 200), seed=st.integers(0, 2**16))
def test_cpp_and_python_identical(lengths, budget, seed):
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(0, 50000, n) for n in lengths]
    segs = [rng.integers(0, 4, n) for n in lengths]
    p_cpp, p_py = _both(lambda: plan_bins(np.array(lengths, np.int64), budget))
    assert len(p_cpp) == len(p_py)
    assert all(np.array_equal(u, v) and u.dtype == v.dtype == np.int64 for u, v in zip(p_cpp, p_py))
    b_cpp, b_py = _both(lambda: pack(seqs, budget, segments=segs))
    _batches_equal(b_cpp, b_py)
    values = [rng.standard_normal((b.num_tokens, 3)) for b in b_cpp]
    u_cpp, u_py = _both(lambda: [b.unpack(v) for b, v in zip(b_cpp, values)])
    for x, y in zip(u_cpp, u_py):
        assert len(x) == len(y) and all(np.array_equal(p, q) for p, q in zip(x, y))


@settings(max_examples=100, deadline=None)
@given(lengths=st.lists(st.integers(0, 300), max_size=80), budget=st.integers(300, 1000),
       seed=st.integers(0, 2**16))
def test_invariants(lengths, budget, seed):
    rng = np.random.default_rng(seed)
    seqs = [torch.from_numpy(rng.integers(0, 1000, n)) for n in lengths]
    segs = [torch.from_numpy(rng.integers(0, 4, n)) for n in lengths]
    for name in BACKENDS if packing._load_native() else ["python"]:
        os.environ["SCORE_FAST_PACKING"] = name
        try:
            batches = pack(seqs, budget, segments=segs)
            bins = plan_bins([len(s) for s in seqs], budget)
        finally:
            del os.environ["SCORE_FAST_PACKING"]
        seen = np.concatenate([b.seq_index.numpy() for b in batches]) if batches else []
        assert sorted(seen) == list(range(len(seqs)))  # every sequence exactly once
        assert [b.seq_index.tolist() for b in batches] == [x.tolist() for x in bins]
        for b in batches:
            lens = torch.tensor([len(seqs[i]) for i in b.seq_index.tolist()])
            assert b.num_tokens == int(lens.sum()) <= budget
            assert b.cu_seqlens.dtype == torch.int32
            assert b.cu_seqlens.tolist() == [0] + lens.cumsum(0).tolist()
            assert b.max_seqlen == int(lens.max())
            assert b.position_ids.tolist()[0] == [p for n in lens.tolist() for p in range(n)]
            assert b.input_ids.shape == b.position_ids.shape == b.segment_ids.shape == (1, b.num_tokens)
            ids, sg = b.unpack(b.input_ids), b.unpack(b.segment_ids)
            for k, i in enumerate(b.seq_index.tolist()):  # order kept, nothing lost
                assert torch.equal(ids[k], seqs[i]) and torch.equal(sg[k], segs[i])
            # each bin's sequences come in ascending input order
            assert b.seq_index.tolist() == sorted(b.seq_index.tolist())


def test_first_fit_decreasing_by_hand(backend):
    # Visit order by length: 5 (idx 1), 4 (idx 3), 3 (idx 0), 3 (idx 4), 2 (idx 2).
    # Budget 7: 5 -> bin0 (room 2); 4 -> bin1 (room 3); 3 (idx 0) -> bin1 (room 0);
    # 3 (idx 4) -> bin2 (room 4); 2 -> bin0 (room 0).
    bins = plan_bins([3, 5, 2, 4, 3], 7)
    assert [b.tolist() for b in bins] == [[1, 2], [0, 3], [4]]
    assert all(b.dtype == np.int64 for b in bins)


def test_fill_ratio_near_one(backend):
    rng = np.random.default_rng(0)
    lengths = rng.integers(16, 4097, 5000)
    bins = plan_bins(lengths, 16384)
    assert lengths.sum() / (len(bins) * 16384) > 0.98


def test_empty_input(backend):
    assert plan_bins([], 10) == []
    assert pack([], 10) == []


def test_zero_length_sequences(backend):
    batches = pack([[], [7, 8], []], 4)
    assert len(batches) == 1
    b = batches[0]
    assert b.cu_seqlens.tolist() == [0, 0, 2, 2] and b.input_ids.tolist() == [[7, 8]]
    assert [p.tolist() for p in b.unpack(b.input_ids)] == [[], [7, 8], []]


def test_unpack_keeps_autograd_and_model_shapes(backend):
    b = pack([[1, 2, 3], [4, 5]], 8)[0]
    x = torch.randn(1, 5, 4, requires_grad=True)  # [1, T, V] as a model returns it
    pieces = b.unpack(x)
    assert [p.shape for p in pieces] == [(3, 4), (2, 4)]
    sum(p.sum() for p in pieces).backward()
    assert torch.equal(x.grad, torch.ones_like(x))
    with pytest.raises(ValueError, match=r"values has shape \(4,\)"):
        b.unpack(torch.zeros(4))


@pytest.mark.parametrize("call, match", [
    (lambda: pack([[1, 2, 3], [1] * 9], 8), r"sequence 1 has length 9 > max_tokens 8"),
    (lambda: plan_bins([3, 9], 8), r"sequence 1 has length 9 > max_tokens 8"),
    (lambda: plan_bins([3, 1], 0), r"max_tokens must be in \[1, 2\*\*31 - 1\], got 0"),
    (lambda: pack([[1]], -5), r"max_tokens must be in .* got -5"),
    (lambda: pack([[1]], 2**31), r"max_tokens must be in .* got 2147483648"),
    (lambda: pack([[1]], 4.0), r"max_tokens must be an integer, got 4.0"),
    (lambda: plan_bins([3, 4, -2], 8), r"sequence 2 has length -2 is negative"),
    (lambda: plan_bins([1.5, 2.0], 8), r"lengths must be a 1-D integer array, got dtype float64"),
    (lambda: pack([[1, 2], np.array([0.5, 1.0])], 8),
     r"sequences\[1\] has dtype float64; token ids must be integers"),
    (lambda: pack([torch.tensor([1.0])], 8), r"sequences\[0\] has dtype float32"),
    (lambda: pack([[1, 2], [[1, 2]]], 8), r"sequences\[1\] must be 1-D, got shape \(1, 2\)"),
    (lambda: pack([[1, 2], [3, -4, 5]], 8), r"sequences\[1\] has negative token id -4 at position 1"),
    (lambda: pack([[1, 2], [3]], 8, segments=[[0, 1]]), r"segments has 1 entries but sequences has 2"),
    (lambda: pack([[1, 2], [3]], 8, segments=[[0, 1], [0, 1]]),
     r"segments\[1\] has length 2 but sequences\[1\] has length 1"),
    (lambda: pack([[1, 2]], 8, segments=[[0.0, 1.0]]), r"segments\[0\] has dtype float64"),
    (lambda: pack("abc", 8), r"sequences must be a sequence of 1-D integer arrays"),
])
def test_bad_input(backend, call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_forced_backend_errors(monkeypatch):
    monkeypatch.setenv("SCORE_FAST_PACKING", "fortran")
    with pytest.raises(ValueError, match="SCORE_FAST_PACKING must be auto, cpp or python"):
        pack([[1]], 4)
    monkeypatch.setenv("SCORE_FAST_PACKING", "cpp")
    monkeypatch.setattr(packing, "_load_native", lambda: None)
    with pytest.raises(ImportError, match="score_fast._C is not built"):
        pack([[1]], 4)


@pytest.mark.skipif(packing._load_native() is None, reason="score_fast._C is not built")
def test_native_rejects_inconsistent_arrays():
    # The Python front end validates; the extension still refuses arrays that disagree
    # instead of reading out of bounds.
    _C = packing._load_native()
    ids = np.arange(5, dtype=np.int64)
    with pytest.raises(ValueError, match="seq_offsets must run from 0 to len"):
        _C.pack(ids, np.array([0, 3, 9]), None, np.array([0, 1]), np.array([0, 2]))
    with pytest.raises(ValueError, match="order has 1 entries, expected 2"):
        _C.pack(ids, np.array([0, 3, 5]), None, np.array([0]), np.array([0, 1]))
    with pytest.raises(ValueError, match="bin plan names sequence 7"):
        _C.pack(ids, np.array([0, 3, 5]), None, np.array([0, 7]), np.array([0, 2]))
    with pytest.raises(ValueError, match="values has 4 tokens but cu_seqlens ends at 5"):
        _C.unpack(np.zeros(4), np.array([0, 2, 5]))


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_llama_matches_unpacked(backend, attn):
    """Sequence boundaries hold in attention: the packed batch through a tiny random Llama
    gives each sequence the logits it gets alone."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=101, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      attn_implementation=attn)
    model = LlamaForCausalLM(cfg).eval()
    seqs = [torch.randint(0, 101, (n,)) for n in (5, 17, 3, 30, 1, 12)]
    batches = pack(seqs, 40)
    assert len(batches) > 1 and any(len(b.seq_index) > 1 for b in batches)
    with torch.no_grad():
        for b in batches:
            # use_cache=False: transformers only derives the packed mask from position_ids
            # when there is no KV cache (a training-style forward).
            logits = model(input_ids=b.input_ids, position_ids=b.position_ids, use_cache=False).logits
            for piece, i in zip(b.unpack(logits), b.seq_index.tolist()):
                alone = model(input_ids=seqs[i][None], use_cache=False).logits[0]
                torch.testing.assert_close(piece, alone, atol=1e-5, rtol=1e-5)
    # Control: without restarting positions the sequences leak into each other.
    b = next(b for b in batches if len(b.seq_index) > 1)
    with torch.no_grad():
        leaky = model(input_ids=b.input_ids, use_cache=False).logits
    last = b.seq_index[-1].item()
    assert not torch.allclose(b.unpack(leaky)[-1], model(input_ids=seqs[last][None], use_cache=False).logits[0], atol=1e-3)


# ------------------------------------------------------------------ balanced_partition
from score_fast.packing import balanced_partition  # noqa: E402


@st.composite
def partition_cases(draw):
    """(lengths, parts): many ties (small length ranges, zeros)."""
    n = draw(st.integers(1, 70))
    hi = draw(st.sampled_from([0, 3, 100, 5000]))
    lengths = draw(st.lists(st.integers(0, hi), min_size=n, max_size=n))
    return lengths, draw(st.integers(1, min(n, 12)))


def _check_partition(out, lengths, parts):
    n = len(lengths)
    assert len(out) == parts and all(isinstance(p, list) for p in out)
    assert sorted(i for p in out for i in p) == list(range(n))  # every item exactly once
    assert all(p and p == sorted(p) for p in out)  # non-empty, ascending
    sums = [sum(lengths[i] for i in p) for p in out]
    assert sums == sorted(sums, reverse=True)
    # largest part - mean part <= largest item (in integers: times parts)
    assert max(sums) * parts - sum(sums) <= max(lengths) * parts


@pytest.mark.skipif(packing._load_native() is None, reason="score_fast._C is not built")
@settings(max_examples=300, deadline=None)
@given(case=partition_cases())
def test_partition_cpp_and_python_identical(case):
    lengths, parts = case
    a, b = _both(lambda: balanced_partition(lengths, parts))
    assert a == b


@settings(max_examples=200, deadline=None)
@given(case=partition_cases())
def test_partition_invariants(case):
    lengths, parts = case
    for name in BACKENDS if packing._load_native() else ["python"]:
        os.environ["SCORE_FAST_PACKING"] = name
        try:
            out = balanced_partition(np.array(lengths, np.int64), parts)
        finally:
            del os.environ["SCORE_FAST_PACKING"]
        _check_partition(out, lengths, parts)


def test_partition_by_hand(backend):
    lengths = [5, 4, 3, 3, 2, 1]
    # Spreads (singletons: their length) pop largest first, ties by index: {5} + {4} ->
    # (5 | 4); {3} + {3} -> (3 | 3); {2} + {1} (ties {1} and (5 | 4): the initial state
    # first) -> (2 | 1); (5 | 4) + (2 | 1) reversed -> (5,1 | 4,2); (3 | 3) + that
    # reversed -> (3,4,2 | 3,5,1): 9 and 9, the part holding item 0 first.
    assert balanced_partition(lengths, 2) == [[0, 3, 5], [1, 2, 4]]
    assert balanced_partition(lengths, 1) == [[0, 1, 2, 3, 4, 5]]
    assert balanced_partition(lengths, 6) == [[0], [1], [2], [3], [4], [5]]
    # Zero lengths still give every part an item (empty slots sort after zero-sum ones).
    assert balanced_partition([5, 0, 0], 3) == [[0], [1], [2]]
    # All spreads 0, so by creation: {0} + {1} -> (0 | 1); {2} + {3} -> (2 | 3); then
    # (0 | 1) + (3 | 2) -> (0,3 | 1,2).
    assert balanced_partition([0, 0, 0, 0], 2) == [[0, 3], [1, 2]]


def test_partition_quality(backend):
    # 64 prompts x 4 samples of 16..4096 tokens onto 8 ranks (the trainer's use), and 5000
    # items: token sums within one item of each other, within 1 token at 5000.
    rng = np.random.default_rng(0)
    lengths = torch.from_numpy(rng.integers(16, 4097, 256))
    out = balanced_partition(lengths, 8)
    _check_partition(out, lengths.tolist(), 8)
    sums = [int(lengths[p].sum()) for p in out]
    assert max(sums) - min(sums) < 4096
    lengths = np.random.default_rng(1).integers(16, 4097, 5000)
    sums = [int(lengths[p].sum()) for p in balanced_partition(lengths, 8)]
    assert max(sums) - min(sums) <= 1


@pytest.mark.parametrize("call, match", [
    (lambda: balanced_partition([1, 2], 0), r"parts must be >= 1, got 0"),
    (lambda: balanced_partition([1, 2], -1), r"parts must be >= 1, got -1"),
    (lambda: balanced_partition([1, 2], 2.0), r"parts must be an integer, got 2.0"),
    (lambda: balanced_partition([1, 2], True), r"parts must be an integer, got True"),
    (lambda: balanced_partition([1, 2], 3), r"parts = 3 > 2 items: every part needs at least one"),
    (lambda: balanced_partition([], 1), r"parts = 1 > 0 items"),
    (lambda: balanced_partition([1, -2, 3], 1), r"sequence 1 has length -2 is negative"),
    (lambda: balanced_partition([1.0, 2.0], 1), r"lengths must be a 1-D integer array"),
])
def test_partition_bad_input(backend, call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.skipif(packing._load_native() is None, reason="score_fast._C is not built")
def test_native_partition_rejects_bad_arrays():
    # The extension checks what the Python front end already does.
    _C = packing._load_native()
    lengths = np.array([3, 1, 2], np.int64)
    with pytest.raises(ValueError, match="sequence 0 has length -3 is negative"):
        _C.balanced_partition(-lengths, 2)
    with pytest.raises(ValueError, match="parts must be >= 1, got 0"):
        _C.balanced_partition(lengths, 0)
    with pytest.raises(ValueError, match=r"parts = 4 > 3 items"):
        _C.balanced_partition(lengths, 4)

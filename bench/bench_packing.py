"""Packing benchmark: the C++ path, the pure-Python fallback and padded batching, side by
side on the same sequences (lengths uniform in 16..4096, bins of 16,384 tokens).

    pytest bench/bench_packing.py --benchmark-json=/tmp/b.json && python bench/report.py /tmp/b.json

plan: bin planning from lengths alone, at 10k / 100k / 1M sequences.
pack: the whole pack() of token ids (ids, positions, cu_seqlens) at 10k / 100k sequences;
      1M sequences would hold 2.1e9 int64 tokens (16 GB) and does not fit this 24 GB machine.
Padded batching fills each batch in input order while (count + 1) * longest <= 16,384 and
pads to the longest; its `fill` is real tokens / padded tokens. Packing's `fill` is real
tokens / bin capacity (bins * 16,384).
partition: balanced_partition of 100k sequences into 8 data-parallel parts (Karmarkar-Karp);
      `spread` is the largest minus the smallest part's tokens."""

import numpy as np
import pytest
import torch

from harness import QUICK, bench_device, run
from score_fast import packing

BUDGET = 16_384
# Packing is host work: under bench/gpu_check.sh (device cuda) only the two smaller sizes
# run, to keep that script inside its 8 minutes; the CPU run measures all of them.
GPU_RUN = bench_device() == "cuda"
PLAN_SIZES = [2_000] if QUICK else [10_000, 100_000] + ([] if GPU_RUN else [1_000_000])
PACK_SIZES = [2_000] if QUICK else [10_000] + ([] if GPU_RUN else [100_000])
PROVIDERS = ["cpp", "python", "padded"]
PARTITION_SIZES = [2_000] if QUICK else [100_000]
PARTS = 8


def _lengths(n: int) -> np.ndarray:
    return np.random.default_rng(n).integers(16, 4097, n)


def _padded_plan(lengths: np.ndarray) -> list[tuple[int, int, int]]:
    """(start, end, longest) of each padded batch; a plain loop, as a data loader does."""
    batches, start, longest = [], 0, 0
    for i, n in enumerate(lengths.tolist()):
        if (i - start + 1) * max(longest, n) > BUDGET:
            batches.append((start, i, longest))
            start, longest = i, 0
        longest = max(longest, n)
    batches.append((start, len(lengths), longest))
    return batches


def _padded_pack(seqs: list[np.ndarray], lengths: np.ndarray):
    out = []
    for s, e, longest in _padded_plan(lengths):
        ids = np.zeros((e - s, longest), np.int64)
        mask = np.arange(longest) < lengths[s:e, None]
        ids[mask] = np.concatenate(seqs[s:e])
        out.append((torch.from_numpy(ids), torch.from_numpy(mask)))
    return out


def _fill(provider: str, lengths: np.ndarray, n_batches: int) -> float:
    if provider == "padded":
        padded = sum((e - s) * m for s, e, m in _padded_plan(lengths))
        return float(lengths.sum() / padded)
    return float(lengths.sum() / (n_batches * BUDGET))


def _select(provider: str, monkeypatch):
    if provider != "padded":
        if provider == "cpp" and packing._load_native() is None:
            pytest.skip("score_fast._C is not built")
        monkeypatch.setenv("SCORE_FAST_PACKING", provider)


@pytest.mark.parametrize("n", PLAN_SIZES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_plan(benchmark, provider, n, monkeypatch):
    _select(provider, monkeypatch)
    lengths = _lengths(n)
    fn = (lambda: _padded_plan(lengths)) if provider == "padded" else (
        lambda: packing.plan_bins(lengths, BUDGET))
    n_batches = len(fn())
    run(benchmark, fn, device="cpu", provider=provider, shape=f"n={n}", dtype="int64",
        baseline="python", rounds=3 if n >= 1_000_000 else 5, bytes_moved=lengths.nbytes,
        fill=round(_fill(provider, lengths, n_batches), 5), batches=n_batches)


@pytest.mark.parametrize("n", PACK_SIZES)
@pytest.mark.parametrize("provider", PROVIDERS)
def test_pack(benchmark, provider, n, monkeypatch):
    _select(provider, monkeypatch)
    lengths = _lengths(n)
    rng = np.random.default_rng(0)
    flat = rng.integers(0, 151_936, int(lengths.sum()))
    seqs = np.split(flat, np.cumsum(lengths)[:-1])
    fn = (lambda: _padded_pack(seqs, lengths)) if provider == "padded" else (
        lambda: packing.pack(seqs, BUDGET))
    n_batches = len(fn())
    # bytes: ids read once, ids + positions written (int64 each)
    run(benchmark, fn, device="cpu", provider=provider, shape=f"n={n}", dtype="int64",
        baseline="python", rounds=3, bytes_moved=3 * flat.nbytes,
        fill=round(_fill(provider, lengths, n_batches), 5), batches=n_batches,
        tokens=int(lengths.sum()))


@pytest.mark.parametrize("n", PARTITION_SIZES)
@pytest.mark.parametrize("provider", ["cpp", "python"])
def test_partition(benchmark, provider, n, monkeypatch):
    _select(provider, monkeypatch)
    lengths = _lengths(n)
    fn = lambda: packing.balanced_partition(lengths, PARTS)  # noqa: E731
    sums = [int(lengths[p].sum()) for p in fn()]
    run(benchmark, fn, device="cpu", provider=provider,
        shape=f"n={n},parts={PARTS}", dtype="int64",
        baseline="python", rounds=3, bytes_moved=lengths.nbytes, spread=max(sums) - min(sums))

"""Packed-sequence batching: variable-length episodes into fixed token budgets.

A SCoRe episode is [prompt, attempt 1, instruction, attempt 2]; padding a batch of them to
the longest wastes about half of every step (lengths 16..4096 uniform: padding efficiency
~0.5), packing them into bins of `max_tokens` wastes ~1%. Attention is kept inside each
sequence by `position_ids` restarting at 0 (transformers 5 derives the varlen boundaries
from them) or by `cu_seqlens` / `max_seqlen` for flash-attn's varlen kernels.

The work runs in the C++ extension score_fast._C when it is built; a pure-Python twin of
every function gives identical results and is used when it is not.
SCORE_FAST_PACKING=python|cpp forces one (cpp raises if the extension is missing).

balanced_partition splits sequences across data-parallel ranks with near-equal token counts.

    from score_fast.packing import pack
    batches = pack([[1, 2, 3], [4, 5]], max_tokens=8, segments=[[0, 1, 1], [0, 2]])
    batches[0].input_ids      # tensor([[1, 2, 3, 4, 5]])
    batches[0].position_ids   # tensor([[0, 1, 2, 0, 1]])
    batches[0].unpack(logp)   # [logp of seq 0, logp of seq 1]
"""
from __future__ import annotations

import functools
import heapq
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

__all__ = ["PackedBatch", "plan_bins", "pack", "balanced_partition", "backend"]

_INT32_MAX = 2**31 - 1  # cu_seqlens are int32 (flash-attn's varlen API)
_INT64_MAX = 2**63 - 1


@functools.cache
def _load_native():
    try:
        from score_fast import _C
    except ImportError:
        return None
    return _C


def backend() -> str:
    """'cpp' or 'python': the implementation the next call will use."""
    want = os.environ.get("SCORE_FAST_PACKING", "auto").lower()
    if want not in ("auto", "cpp", "python"):
        raise ValueError(f"SCORE_FAST_PACKING must be auto, cpp or python, got {want!r}")
    if want == "python":
        return "python"
    if _load_native() is None:
        if want == "cpp":
            raise ImportError("SCORE_FAST_PACKING=cpp but score_fast._C is not built; "
                              "reinstall with `pip install -e .` and a C++17 compiler")
        return "python"
    return "cpp"


@dataclass
class PackedBatch:
    """One bin of sequences, concatenated. T = tokens in the bin, n = sequences in it."""

    input_ids: torch.Tensor  # int64 [1, T]
    position_ids: torch.Tensor  # int64 [1, T], restarting at 0 for each sequence
    cu_seqlens: torch.Tensor  # int32 [n + 1], running sum of the sequence lengths
    max_seqlen: int
    seq_index: torch.Tensor  # int64 [n], position of each sequence in pack()'s input
    segment_ids: torch.Tensor | None = None  # int64 [1, T], the caller's labels, unchanged

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[1]

    def unpack(self, values):
        """Split a per-token array of this batch into one piece per sequence (views, no copy),
        in the order of `seq_index`. `values` is a torch tensor or numpy array whose first
        axis is the T packed tokens, or [1, T, ...] as a model returns it."""
        if values.ndim >= 2 and values.shape[0] == 1 and values.shape[1] == self.num_tokens:
            values = values[0]
        if values.ndim < 1 or values.shape[0] != self.num_tokens:
            raise ValueError(f"unpack: values has shape {tuple(values.shape)}, expected "
                             f"[{self.num_tokens}, ...] or [1, {self.num_tokens}, ...]")
        if isinstance(values, torch.Tensor):  # keeps device and autograd
            return list(values.split(self.cu_seqlens.diff().tolist()))
        cu = self.cu_seqlens.numpy().astype(np.int64)
        native = _load_native() if backend() == "cpp" else None
        return native.unpack(values, cu) if native else _py_unpack(values, cu)


def plan_bins(lengths, max_tokens: int) -> list[np.ndarray]:
    """Assign sequence indices to bins of at most `max_tokens` tokens, first-fit-decreasing:
    longest first (ties: lower index first), each into the lowest-numbered bin with room.
    Returns one int64 index array per bin, indices ascending within a bin."""
    max_tokens = _check_budget(max_tokens)
    lengths = _check_lengths(lengths, max_tokens)
    order, bin_offsets = _plan(lengths, max_tokens)
    cuts = bin_offsets.tolist()
    return [order[a:b] for a, b in zip(cuts[:-1], cuts[1:])]  # views; np.split is 6x slower


def pack(sequences: Sequence, max_tokens: int, segments: Sequence | None = None
         ) -> list[PackedBatch]:
    """Pack token-id sequences (lists, numpy arrays or 1-D tensors of integers) into bins of
    at most `max_tokens` tokens (see plan_bins). `segments`, if given, holds one integer
    label per token of each sequence and comes back packed as `segment_ids`."""
    max_tokens = _check_budget(max_tokens)
    ids, lengths = _flatten(sequences, "sequences")
    seg = None
    if segments is not None:
        if len(segments) != len(lengths):
            raise ValueError(f"segments has {len(segments)} entries but sequences has "
                             f"{len(lengths)}")
        seg, seg_lengths = _flatten(segments, "segments", check_negative=False)
        bad = np.flatnonzero(seg_lengths != lengths)
        if len(bad):
            i = int(bad[0])
            raise ValueError(f"segments[{i}] has length {seg_lengths[i]} but sequences[{i}] "
                             f"has length {lengths[i]}")
    _check_lengths(lengths, max_tokens)
    if len(lengths) == 0:
        return []
    order, bin_offsets = _plan(lengths, max_tokens)
    seq_offsets = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=seq_offsets[1:])
    packed = (_load_native().pack if backend() == "cpp" else _py_pack)(
        ids, seq_offsets, seg, order, bin_offsets)
    input_ids, position_ids, segment_ids, cu_seqlens, token_offsets, max_seqlen = packed
    as_row = lambda a, lo, hi: torch.from_numpy(a[lo:hi]).unsqueeze(0)  # noqa: E731
    batches = []
    for b in range(len(bin_offsets) - 1):
        lo, hi = int(token_offsets[b]), int(token_offsets[b + 1])
        s0, s1 = int(bin_offsets[b]), int(bin_offsets[b + 1])
        batches.append(PackedBatch(
            input_ids=as_row(input_ids, lo, hi),
            position_ids=as_row(position_ids, lo, hi),
            cu_seqlens=torch.from_numpy(cu_seqlens[s0 + b:s1 + b + 1]),
            max_seqlen=int(max_seqlen[b]),
            seq_index=torch.from_numpy(order[s0:s1]),
            segment_ids=None if segment_ids is None else as_row(segment_ids, lo, hi)))
    return batches


def balanced_partition(lengths, parts: int) -> list[list[int]]:
    """Split item indices into `parts` lists (one per data-parallel rank) with near-equal
    token sums: Karmarkar-Karp largest differencing for k-way partitioning.

    Method: every item starts as a state of `parts` slots, one holding the item and the
    rest empty. Until one state is left, the two states of largest spread (heaviest minus
    lightest slot) merge, slot i of the first with slot parts-1-i of the second (heaviest
    with lightest), and the merged slots are re-sorted. The largest part sum exceeds the
    mean by at most the largest item: a merge never widens the spread past its inputs'.

    Tie-breaks (the C++ and Python paths agree exactly):
      - states with equal spread: the one created first (initial states by index, merged
        states after all initial ones, in merge order);
      - slots within a state: sum descending, then item count descending (empty slots
        last), remaining ties keep their order (stable sort);
      - the returned parts: token sum descending, ties by smallest item index.

    Returns `parts` lists of item indices, ascending within each; every part is non-empty.
    O(n * (parts * log parts + log n)) time, O(n + parts * live states) memory.

        balanced_partition([5, 4, 3, 3, 2, 1], 2)   # [[0, 3, 5], [1, 2, 4]]: 9 and 9 tokens
    """
    if isinstance(parts, bool) or not isinstance(parts, (int, np.integer)):
        raise ValueError(f"parts must be an integer, got {parts!r}")
    parts = int(parts)
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    lengths = _check_lengths(lengths, _INT64_MAX)
    if parts > len(lengths):
        raise ValueError(f"parts = {parts} > {len(lengths)} items: every part needs at least "
                         f"one")
    run = _load_native().balanced_partition if backend() == "cpp" else _py_balanced_partition
    order, offsets = run(lengths, parts)
    cuts = offsets.tolist()
    return [order[a:b].tolist() for a, b in zip(cuts[:-1], cuts[1:])]


# ---------------------------------------------------------------- input checks (shared)
def _check_budget(max_tokens) -> int:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, (int, np.integer)):
        raise ValueError(f"max_tokens must be an integer, got {max_tokens!r}")
    if not 0 < max_tokens <= _INT32_MAX:
        raise ValueError(f"max_tokens must be in [1, 2**31 - 1], got {max_tokens}")
    return int(max_tokens)


def _check_lengths(lengths, max_tokens: int) -> np.ndarray:
    arr = lengths.cpu().numpy() if isinstance(lengths, torch.Tensor) else np.asarray(lengths)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.ndim != 1 or arr.dtype.kind not in "iu":
        raise ValueError(f"lengths must be a 1-D integer array, got dtype {arr.dtype} "
                         f"and shape {arr.shape}")
    arr = arr.astype(np.int64, copy=False)
    for bad, what in ((arr < 0, "is negative"), (arr > max_tokens, f"> max_tokens {max_tokens}")):
        hit = np.flatnonzero(bad)
        if len(hit):
            i = int(hit[0])
            raise ValueError(f"sequence {i} has length {arr[i]} {what}")
    return arr


def _flatten(seqs, name: str, check_negative: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """All sequences back to back as one int64 array, plus their lengths."""
    if isinstance(seqs, (str, bytes)) or not hasattr(seqs, "__len__"):
        raise ValueError(f"{name} must be a sequence of 1-D integer arrays, got {type(seqs)}")
    arrays = []
    for i, s in enumerate(seqs):
        a = s.detach().cpu().numpy() if isinstance(s, torch.Tensor) else np.asarray(s)
        if a.ndim != 1:
            raise ValueError(f"{name}[{i}] must be 1-D, got shape {a.shape}")
        if a.dtype.kind not in "iu" and a.size:
            raise ValueError(f"{name}[{i}] has dtype {a.dtype}; token ids must be integers")
        arrays.append(a)
    lengths = np.fromiter((len(a) for a in arrays), np.int64, len(arrays))
    flat = np.concatenate(arrays).astype(np.int64, copy=False) if arrays else np.zeros(0, np.int64)
    if check_negative and flat.size and flat.min() < 0:
        k = int(np.flatnonzero(flat < 0)[0])
        i = int(np.searchsorted(np.cumsum(lengths), k, side="right"))
        pos = k - int(lengths[:i].sum())
        raise ValueError(f"{name}[{i}] has negative token id {flat[k]} at position {pos}")
    return flat, lengths


def _plan(lengths: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    if backend() == "cpp":
        return _load_native().plan_bins(lengths, max_tokens)
    return _py_plan_bins(lengths, max_tokens)


# ------------------------------------------------- pure-Python twins of csrc/packing.cpp
def _py_plan_bins(lengths: np.ndarray, max_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    lens = lengths.tolist()
    n = len(lens)
    if n == 0:
        return np.zeros(0, np.int64), np.zeros(1, np.int64)
    visit = sorted(range(n), key=lambda i: -lens[i])  # stable: ties keep index order
    leaves = 1
    while leaves < n:
        leaves <<= 1
    room = [max_tokens] * (2 * leaves)  # max-tree of the room left in each potential bin
    bin_of = [0] * n
    n_bins = 0
    for item in visit:
        need = lens[item]
        node = 1
        while node < leaves:
            node = 2 * node if room[2 * node] >= need else 2 * node + 1
        bin_of[item] = node - leaves
        n_bins = max(n_bins, node - leaves + 1)
        room[node] -= need
        node >>= 1
        while node:
            left, right = room[2 * node], room[2 * node + 1]
            room[node] = left if left > right else right
            node >>= 1
    bins = np.asarray(bin_of, np.int64)
    order = np.argsort(bins, kind="stable").astype(np.int64)
    bin_offsets = np.zeros(n_bins + 1, np.int64)
    np.cumsum(np.bincount(bins, minlength=n_bins), out=bin_offsets[1:])
    return order, bin_offsets


def _py_balanced_partition(lengths: np.ndarray, parts: int) -> tuple[np.ndarray, np.ndarray]:
    # Inputs are validated by balanced_partition. A slot is (sum, item count, head, tail)
    # of a linked list of items through `nxt`; a heap entry is (-spread, id, slots), slots
    # None for a singleton state (item = id) not yet materialised.
    k, n = parts, len(lengths)
    weight, m = lengths.tolist(), n
    nxt = [-1] * m
    rest = [(0, 0, -1, -1)] * (k - 1)
    heavier_first = lambda s: (-s[0], -s[1])  # noqa: E731  list.sort is stable
    heap = [(-weight[u] if k > 1 else 0, u, None) for u in range(m)]
    next_id = m
    heapq.heapify(heap)  # (-spread, id) are unique: the pop order is fixed
    pop, push = heapq.heappop, heapq.heappush
    while len(heap) > 1:
        _, ida, a = pop(heap)
        _, idb, b = pop(heap)
        if a is None:
            a = [(weight[ida], 1, ida, ida)] + rest
        if b is None:
            b = [(weight[idb], 1, idb, idb)] + rest
        merged = []
        for x, y in zip(a, reversed(b)):
            if x[2] < 0:
                merged.append((x[0] + y[0], x[1] + y[1], y[2], y[3]))
            elif y[2] < 0:
                merged.append((x[0] + y[0], x[1] + y[1], x[2], x[3]))
            else:
                nxt[x[3]] = y[2]
                merged.append((x[0] + y[0], x[1] + y[1], x[2], y[3]))
        merged.sort(key=heavier_first)
        push(heap, (merged[-1][0] - merged[0][0], next_id, merged))
        next_id += 1
    _, last, final = heap[0]
    if final is None:
        final = [(weight[last], 1, last, last)] + rest
    part_of_item = [0] * m
    for i, s in enumerate(final):
        u = s[2]
        while u >= 0:
            part_of_item[u] = i
            u = nxt[u]
    part = np.asarray(part_of_item, np.int64)
    sums = np.zeros(k, np.int64)
    np.add.at(sums, part, lengths)
    first = np.full(k, n, np.int64)
    np.minimum.at(first, part, np.arange(n, dtype=np.int64))
    rank = np.lexsort((first, -sums))  # token sum descending, then first item
    new_of = np.empty(k, np.int64)
    new_of[rank] = np.arange(k)
    part = new_of[part]
    order = np.argsort(part, kind="stable").astype(np.int64)
    offsets = np.zeros(k + 1, np.int64)
    np.cumsum(np.bincount(part, minlength=k), out=offsets[1:])
    return order, offsets


def _py_pack(ids, seq_offsets, segments, order, bin_offsets):
    n_bins = len(bin_offsets) - 1
    starts, ends = seq_offsets[:-1][order], seq_offsets[1:][order]
    lens = ends - starts
    gather = np.concatenate([np.arange(s, e) for s, e in zip(starts.tolist(), ends.tolist())]
                            ) if len(order) else np.zeros(0, np.int64)
    position_ids = np.concatenate([np.arange(n) for n in lens.tolist()]).astype(np.int64)
    cu_seqlens = np.zeros(len(order) + n_bins, np.int32)
    token_offsets = np.zeros(n_bins + 1, np.int64)
    max_seqlen = np.zeros(n_bins, np.int64)
    for b in range(n_bins):
        s0, s1 = int(bin_offsets[b]), int(bin_offsets[b + 1])
        cu_seqlens[s0 + b + 1:s1 + b + 1] = np.cumsum(lens[s0:s1])
        token_offsets[b + 1] = token_offsets[b] + lens[s0:s1].sum()
        max_seqlen[b] = lens[s0:s1].max(initial=0)
    return (ids[gather], position_ids, None if segments is None else segments[gather],
            cu_seqlens, token_offsets, max_seqlen)


def _py_unpack(values: np.ndarray, cu: np.ndarray) -> list[np.ndarray]:
    return [values[cu[i]:cu[i + 1]] for i in range(len(cu) - 1)]

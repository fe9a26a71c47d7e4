"""SCoRe per-attempt advantages: shaped rewards, then a per-prompt baseline.

For E episodes (x, y1, p, y2) with binary-or-real rewards r1 = r(y1), r2 = r(y2):

    stage 1:  R[:, 0] = 0         R[:, 1] = r2                     (y1 gets no policy gradient)
    stage 2:  R[:, 0] = r1        R[:, 1] = r2 + alpha * (r2 - r1) (alpha = 10: +11, +1, 0, -10)

Then per column, within each group G (episodes sharing a prompt id), n = |G|:

    "rloo":  A_i = R_i - (sum_{j in G, j != i} R_j) / (n - 1) = (n R_i - sum_G R) / (n - 1)
             (n = 1: A_i = 0, there is no other sample to compare with)
    "mean":  A_i = R_i - mean_G
    "none":  A_i = R_i
    normalize=True:  A_i /= std_G + 1e-6, std_G the POPULATION std (ddof 0) of R over the
             group; a group of one or a constant group has std 0 and keeps its (zero,
             unless baseline="none") advantage, up to the 1e-6 guard.

No gradient. Output fp32 [E, 2]: column 0 for attempt 1, column 1 for attempt 2.

Sync-free GPU design: sort the group ids (stable), find each position's segment [start, end)
with two torch.searchsorted calls (static shapes, no torch.unique), then ONE kernel launch
with a program per sorted position; the program at a segment's start reduces and writes its
whole segment, the others do nothing. Deterministic: fixed summation order per segment.

    from score_fast.kernels.score_advantages import score_advantages
    adv = score_advantages(r1, r2, prompt_id, stage=2, alpha=10.0, baseline="rloo")
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from ._dispatch import use_triton

__all__ = ["score_advantages", "score_advantages_ref", "BASELINES", "STD_EPS"]

BASELINES = ("rloo", "mean", "none")
STD_EPS = 1e-6  # rewards are O(1) (binary, shaped up to 1 + alpha): 1e-6 is far below any real std


@triton.jit
def _shaped(r1, r2, alpha, STAGE: tl.constexpr):
    """Shaped rewards (R[:, 0], R[:, 1]) for a block of episodes."""
    if STAGE == 1:
        return tl.zeros_like(r1), r2
    else:
        return r1, r2 + alpha * (r2 - r1)


@triton.jit
def _advantage_kernel(
    # pointers
    r1_ptr, r2_ptr, order_ptr, start_ptr, end_ptr, out_ptr,
    # scalars
    alpha, eps,
    # meta-parameters
    STAGE: tl.constexpr, BASELINE: tl.constexpr, NORMALIZE: tl.constexpr, BLOCK: tl.constexpr,
):
    p = tl.program_id(0)  # a position in the sorted order
    start = tl.load(start_ptr + p)
    end = tl.load(end_ptr + p)
    hi = tl.where(start == p, end, p)  # only a segment's first position does any work
    cnt = (end - start).to(tl.float32)

    # pass 1: group sums of both columns (blockwise accumulators, reduced once at the end)
    acc0 = tl.zeros([BLOCK], dtype=tl.float32)
    acc1 = tl.zeros([BLOCK], dtype=tl.float32)
    for j in range(p, hi, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        m = offs < hi
        idx = tl.load(order_ptr + offs, mask=m, other=0)
        c0, c1 = _shaped(tl.load(r1_ptr + idx, mask=m, other=0.0),
                         tl.load(r2_ptr + idx, mask=m, other=0.0), alpha, STAGE)
        acc0 += tl.where(m, c0, 0.0)
        acc1 += tl.where(m, c1, 0.0)
    s0 = tl.sum(acc0)
    s1 = tl.sum(acc1)
    mean0 = s0 / cnt
    mean1 = s1 / cnt

    # pass 2 (normalize only): population variance from centred values. One-pass
    # E[R^2] - E[R]^2 cancels: at R ~ 11 with std 0.1 it subtracts two numbers ~121 to get
    # 0.01, losing 4 of fp32's 7 digits.
    inv0 = 1.0
    inv1 = 1.0
    if NORMALIZE:
        acc0 = tl.zeros([BLOCK], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK], dtype=tl.float32)
        for j in range(p, hi, BLOCK):
            offs = j + tl.arange(0, BLOCK)
            m = offs < hi
            idx = tl.load(order_ptr + offs, mask=m, other=0)
            c0, c1 = _shaped(tl.load(r1_ptr + idx, mask=m, other=0.0),
                             tl.load(r2_ptr + idx, mask=m, other=0.0), alpha, STAGE)
            acc0 += tl.where(m, (c0 - mean0) * (c0 - mean0), 0.0)
            acc1 += tl.where(m, (c1 - mean1) * (c1 - mean1), 0.0)
        inv0 = 1.0 / (tl.sqrt(tl.sum(acc0) / cnt) + eps)
        inv1 = 1.0 / (tl.sqrt(tl.sum(acc1) / cnt) + eps)

    # baseline as A = k * (c * R - b); rloo as (n R_i - S) / (n - 1), which is exact for
    # integer rewards (n/(n-1) * (R_i - S/n) rounds S/n: 0.49999997 instead of 0.5)
    if BASELINE == "rloo":
        c = cnt
        k = tl.where(cnt > 1.0, 1.0 / tl.maximum(cnt - 1.0, 1.0), 0.0)
        b0 = s0
        b1 = s1
    elif BASELINE == "mean":
        c = 1.0
        k = 1.0
        b0 = mean0
        b1 = mean1
    else:
        c = 1.0
        k = 1.0
        b0 = 0.0
        b1 = 0.0

    # pass 3: write both columns back in the caller's episode order
    for j in range(p, hi, BLOCK):
        offs = j + tl.arange(0, BLOCK)
        m = offs < hi
        idx = tl.load(order_ptr + offs, mask=m, other=0)
        c0, c1 = _shaped(tl.load(r1_ptr + idx, mask=m, other=0.0),
                         tl.load(r2_ptr + idx, mask=m, other=0.0), alpha, STAGE)
        tl.store(out_ptr + 2 * idx, k * (c * c0 - b0) * inv0, mask=m)
        tl.store(out_ptr + 2 * idx + 1, k * (c * c1 - b1) * inv1, mask=m)


_BLOCK = 128  # a group is one prompt's samples (2..64 typically): one or two blocks per pass


def _gate_cases():
    """Every launch _advantages_triton makes on a GPU (each STAGE, BASELINE, NORMALIZE), on
    meta tensors (no data), for the compile gate (bench/compile_gate.py)."""
    r = torch.empty(512, device="meta")
    group = torch.empty(512, dtype=torch.int64, device="meta")
    for stage, baseline, normalize in itertools.product((1, 2), BASELINES, (False, True)):
        yield functools.partial(_advantages_triton, r, r, group, stage, 10.0, baseline,
                                normalize)


def _segments(group: torch.Tensor):
    """Stable sort of the group ids and, per sorted position, its group's [start, end)."""
    keys, order = torch.sort(group, stable=True)
    start = torch.searchsorted(keys, keys, right=False, out_int32=True)
    end = torch.searchsorted(keys, keys, right=True, out_int32=True)
    return order, start, end


def _advantages_triton(r1, r2, group, stage, alpha, baseline, normalize):
    E = r1.numel()
    out = torch.empty(E, 2, dtype=torch.float32, device=r1.device)
    if E:
        order, start, end = _segments(group)
        _advantage_kernel[(E,)](r1, r2, order, start, end, out, float(alpha), STD_EPS,
                                STAGE=stage, BASELINE=baseline, NORMALIZE=normalize,
                                BLOCK=_BLOCK)
    return out


def _advantages_torch(r1, r2, group, stage, alpha, baseline, normalize):
    """Same algorithm in torch ops: segment sums by index_add_ on the segment start."""
    if stage == 1:
        R = torch.stack([torch.zeros_like(r2), r2], dim=1)
    else:
        R = torch.stack([r1, r2 + alpha * (r2 - r1)], dim=1)
    order, start, end = _segments(group)
    start, Rs = start.long(), R[order]
    cnt = (end - start).to(R.dtype)[:, None]
    total = torch.zeros_like(Rs).index_add_(0, start, Rs)[start]
    mean = total / cnt
    if baseline == "rloo":  # (n R_i - S) / (n - 1): exact for integer rewards
        A = (cnt * Rs - total) / (cnt - 1).clamp(min=1) * (cnt > 1)
    elif baseline == "mean":
        A = Rs - mean
    else:
        A = Rs
    if normalize:
        var = torch.zeros_like(Rs).index_add_(0, start, (Rs - mean) ** 2)[start] / cnt
        A = A / (var.sqrt() + STD_EPS)
    return torch.empty_like(A).index_copy_(0, order, A)


def _check_advantage_args(r1, r2, group, stage, baseline):
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if r1.dim() != 1:
        raise ValueError(f"r1 must be 1-D [E], got shape {tuple(r1.shape)}")
    if r2.shape != r1.shape:
        raise ValueError(f"r2 shape {tuple(r2.shape)} does not match r1 shape {tuple(r1.shape)}")
    if group.shape != r1.shape:
        raise ValueError(f"group shape {tuple(group.shape)} does not match "
                         f"r1 shape {tuple(r1.shape)}")
    if group.is_floating_point() or group.is_complex() or group.dtype == torch.bool:
        raise ValueError(f"group must hold integer prompt ids, got dtype {group.dtype}")


@torch.no_grad()
def score_advantages(r1: torch.Tensor, r2: torch.Tensor, group: torch.Tensor, *, stage: int,
                     alpha: float = 10.0, baseline: str = "rloo",
                     normalize: bool = False) -> torch.Tensor:
    """fp32 [E, 2] advantages (attempt 1, attempt 2) of E episodes; formulas in the module doc.

    r1, r2: [E] rewards of attempts 1 and 2 (bool, int or float). group: [E] integer prompt
    ids, any values (unsorted, negative, sparse). stage: 1 or 2. alpha: stage-2 shaping.
    baseline: "rloo", "mean" or "none". normalize: divide by group std + 1e-6 (population).
    """
    _check_advantage_args(r1, r2, group, stage, baseline)
    r1 = r1.detach().to(torch.float32).contiguous()
    r2 = r2.detach().to(torch.float32).contiguous()
    group = group.contiguous()
    fn = _advantages_triton if use_triton(r1, r2, group) else _advantages_torch
    return fn(r1, r2, group, stage, alpha, baseline, normalize)


def score_advantages_ref(r1, r2, group, *, stage, alpha=10.0, baseline="rloo",
                         normalize=False):
    """Plain-torch specification, a loop over groups, in r1's float dtype (fp64-capable)."""
    dtype = r1.dtype if r1.is_floating_point() else torch.float32
    r1, r2 = r1.to(dtype), r2.to(dtype)
    R = torch.stack([torch.zeros_like(r2), r2] if stage == 1
                    else [r1, r2 + alpha * (r2 - r1)], dim=1)
    A = torch.zeros_like(R)
    for g in torch.unique(group):
        rows = (group == g).nonzero().squeeze(1)
        Rg = R[rows]
        n = len(rows)
        if baseline == "rloo":
            Ag = (Rg - (Rg.sum(0) - Rg) / (n - 1)) if n > 1 else torch.zeros_like(Rg)
        elif baseline == "mean":
            Ag = Rg - Rg.mean(0)
        else:
            Ag = Rg
        if normalize:
            Ag = Ag / (Rg.std(0, correction=0) + STD_EPS)
        A[rows] = Ag
    return A

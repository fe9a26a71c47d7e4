"""The SCoRe policy loss over packed or padded tokens: REINFORCE (or PPO-clip) + beta * KL.

Per token t with turn k = turn[t] in {1, 2} (turn 0: prompt, instruction, padding: no loss),
episode e = episode[t], A = advantages[e, k - 1], d = logp - ref_logp:

    pg_t = -A * logp                                          (on-policy REINFORCE)
    pg_t = -min(r * A, clip(r, 1 - lo, 1 + hi) * A),  r = exp(logp - old_logp)     (PPO-clip)
    l_t  = pg_t + beta_t * KL_kind(d)            (KL_kind and its gradient: kl_penalty.py)
    l_t  = pg_t + beta_t * r * KL_kind(d)        (kl_ratio=True, with clip_eps)

kl_ratio weights the KL term by the (differentiable) ratio r: its gradient is then
r * (KL' + KL), for k3 r * d, the unbiased gradient of the reverse KL(pi || pi_ref) from
samples of pi_old (DeepSeek-V3.2; TRL's use_bias_correction_kl, on by default there; on
policy r = 1 in value but not in gradient). The kl_t1 / kl_t2 metrics are then means of
r * KL, the importance-weighted estimate the loss uses (what TRL logs as "kl").

The KL term's expected gradient depends on the estimator (kl_penalty.py's module doc):
kl="k2" gives that of the per-token KL(pi || pi_ref), the paper's (the trainer's default,
score_fast.config.KL_ESTIMATORS); "k3" (this op's default: the unbiased, non-negative VALUE
estimate, which the kl_t1 / kl_t2 metrics then report) gives that of the reverse
KL(pi_ref || pi); "k1" gives none.

    stage 1:  turn-1 tokens: pg_t = 0, beta_t = beta2 (attempt 1 is only held near pi_ref)
              turn-2 tokens: pg_t as above, beta_t = beta1
    stage 2:  both turns: pg_t as above, beta_t = beta1

    dpg_t/dlogp = -A (REINFORCE); -A * r where the unclipped term is the min, else 0 (PPO)
    dl_t/dlogp  = dpg_t/dlogp + beta_t * dKL/dlogp

Reductions, over the N loss tokens (turn > 0) and the M episodes with at least one (n_e
each, both turns together):  loss = sum_t w_t * l_t  with w_t =
    "token_mean":           1 / N
    "seq_mean_token_mean":  1 / (M * n_e)
    "seq_mean_token_sum":   1 / M
and N = 0 gives loss 0 with zero gradients. Gradient flows to logp only (ref_logp, old_logp
and advantages are constants).

clip_eps is eps (lo = hi = eps) or a pair (lo, hi) (DAPO's asymmetric "clip-higher").
clip_eps without old_logp takes old_logp = logp (detached): r = 1, pg_t = -A, the gradient
of REINFORCE with the ratio form's loss value; that is GRPO's convention when each batch gets
one gradient step (TRL's GRPOTrainer without old log-probs; score_fast.integrations.trl is
the caller that needs it). old_logp without clip_eps is refused: a ratio without a clip
range is REINFORCE's gradient at r = 1 and only adds a way to get it wrong.

Metrics (detached 0-d fp32 tensors, no host sync; an empty set gives 0):
    kl_t1, kl_t2      mean KL_kind over turn-1 / turn-2 tokens (before beta)
    logp_t1, logp_t2  mean logp over turn-1 / turn-2 tokens
    pg_loss, kl_loss  the loss's two parts, same reduction: loss = pg_loss + kl_loss
    num_tokens        N
    clip_frac         (with clipping) fraction of policy-gradient tokens whose clipped term
                      is strictly the smaller one (their pg gradient is 0)

One fused Triton kernel computes l_t and w_t * dl_t/dlogp per token and writes per-block
partial sums; backward is grad_out * (saved per-token gradient). linear_score_loss runs the
same per-token math on the log-probs it forms from hidden states: it uses this file's
STATS, reduction_weights, score_loss_triton / score_loss_torch (the Triton and PyTorch paths,
each giving the fp64 sums and the per-token gradient), score_metrics and check_score_args.

    from score_fast.kernels.score_loss import score_loss
    loss, m = score_loss(logp, ref_logp, turn, episode, adv, stage=2)
"""
from __future__ import annotations

import functools
import itertools

import torch
import triton
import triton.language as tl

from ._dispatch import checks_enabled, use_triton
from .kl_penalty import KL_KINDS, check_kind, kl_and_grad, kl_and_grad_torch, kl_penalty_ref

__all__ = ["score_loss", "score_loss_ref", "REDUCTIONS"]

REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")

# per-block partial sums, in this order (summed over blocks in fp64 by torch: deterministic,
# no atomics, and the counts stay exact past fp32's 2^24 = 16.7M tokens)
STATS = ("pg_loss", "kl_loss", "kl_sum1", "kl_sum2", "logp_sum1", "logp_sum2",
         "n1", "n2", "n_pg", "n_clipped")


@triton.jit
def _score_loss_kernel(
    # pointers
    logp_ptr, ref_ptr, old_ptr, turn_ptr, ep_ptr, adv_ptr, cnt_ptr, scale_ptr,
    grad_ptr, part_ptr,
    # sizes and strides
    n, stride_ae, stride_ac,
    # scalars
    beta1, beta2, clip_lo, clip_hi,
    # meta-parameters
    STAGE: tl.constexpr, KIND: tl.constexpr, CLIP: tl.constexpr, KL_RATIO: tl.constexpr,
    PER_EPISODE: tl.constexpr,
    NUM_STATS: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)  # T may pass 2^31 packed tokens
    inb = offs < n
    turn = tl.load(turn_ptr + offs, mask=inb, other=0)
    t1 = turn == 1
    t2 = turn == 2
    live = t1 | t2
    # turn-0 tokens may carry any episode (e.g. -1): never used as an index
    ep = tl.where(live, tl.load(ep_ptr + offs, mask=inb, other=0), 0).to(tl.int64)
    logp = tl.load(logp_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    ref = tl.load(ref_ptr + offs, mask=inb, other=0.0).to(tl.float32)
    adv = tl.load(adv_ptr + ep * stride_ae + (turn - 1).to(tl.int64) * stride_ac,
                  mask=live, other=0.0).to(tl.float32)

    if CLIP:
        old = tl.load(old_ptr + offs, mask=inb, other=0.0).to(tl.float32)
        ratio = tl.exp(logp - old)
        surr = ratio * adv
        surr_clip = tl.minimum(tl.maximum(ratio, clip_lo), clip_hi) * adv
        clipped = surr_clip < surr
        pg = -tl.minimum(surr, surr_clip)
        dpg = tl.where(clipped, 0.0, -surr)
    else:
        clipped = turn < 0  # all False
        pg = -adv * logp
        dpg = -adv
    if STAGE == 1:
        has_pg = t2
        beta = tl.where(t1, beta2, beta1)
    else:
        has_pg = live
        beta = tl.zeros_like(logp) + beta1
    kl, dkl = kl_and_grad(logp - ref, KIND)
    if KL_RATIO:  # the KL term is r * KL: value r KL, gradient r (KL' + KL)
        klt = kl * ratio
        dklt = (dkl + kl) * ratio
    else:
        klt = kl
        dklt = dkl

    scale = tl.load(scale_ptr)
    if PER_EPISODE:
        w = scale / tl.load(cnt_ptr + ep, mask=live, other=1).to(tl.float32)
    else:
        w = tl.zeros_like(logp) + scale
    # where, not a multiply by 0: padding may hold logp = -inf
    w = tl.where(live, w, 0.0)
    pg = tl.where(has_pg, pg, 0.0)
    dpg = tl.where(has_pg, dpg, 0.0)
    clipped = clipped & has_pg
    klt = tl.where(live, klt, 0.0)
    dklt = tl.where(live, dklt, 0.0)
    logp = tl.where(live, logp, 0.0)
    tl.store(grad_ptr + offs, w * (dpg + beta * dklt), mask=inb)

    part = part_ptr + pid * NUM_STATS
    tl.store(part + 0, tl.sum(w * pg))
    tl.store(part + 1, tl.sum(w * beta * klt))
    tl.store(part + 2, tl.sum(tl.where(t1, klt, 0.0)))
    tl.store(part + 3, tl.sum(tl.where(t2, klt, 0.0)))
    tl.store(part + 4, tl.sum(tl.where(t1, logp, 0.0)))
    tl.store(part + 5, tl.sum(tl.where(t2, logp, 0.0)))
    tl.store(part + 6, tl.sum(t1.to(tl.float32)))
    tl.store(part + 7, tl.sum(t2.to(tl.float32)))
    tl.store(part + 8, tl.sum(has_pg.to(tl.float32)))
    tl.store(part + 9, tl.sum(clipped.to(tl.float32)))


# elementwise with a block reduction: 2048 tokens / 8 warps = 8 a thread. The compile gate
# (bench/compile_gate.py) found ptxas spilling 4-8 B a thread at 1024 / 4 warps (triton 3.9,
# sm_90a) and at 1024 / 8 warps (triton 3.6, sm_80, at 40 registers); 2048 / 8 compiles
# every STAGE/KIND/CLIP/PER_EPISODE variant at 56-112 registers without a spill on sm_80,
# sm_90a and sm_100a under both. The kernel reads ~24 B a token: at T = 65536 it is 1.5 MB,
# a few microseconds, launch-bound whatever the block.
_BLOCK, _WARPS = 2048, 8


def _gate_cases():
    """Every launch score_loss_triton makes on a GPU (each STAGE, KIND, CLIP, KL_RATIO (with
    CLIP only), PER_EPISODE), on meta tensors (no data), for the compile gate
    (bench/compile_gate.py)."""
    T, E = 8192, 512
    meta = dict(device="meta")
    x = torch.empty(T, dtype=torch.bfloat16, **meta)
    ids = torch.empty(T, dtype=torch.int64, **meta)
    adv = torch.empty(E, 2, **meta)
    cnt, scale = torch.empty(E, dtype=torch.int32, **meta), torch.empty(1, **meta)
    for stage, kind, (clip, kl_ratio), per_episode in itertools.product(
            (1, 2), KL_KINDS, ((False, False), (True, False), (True, True)), (False, True)):
        yield functools.partial(score_loss_triton, x, x, x if clip else None, ids, ids, adv,
                                cnt, scale, stage, 0.01, 0.1, kind, 0.2 if clip else None,
                                kl_ratio, per_episode)


def reduction_weights(turn, episode, E, reduction):
    """Per-episode loss-token counts (int32, for seq_mean_token_mean) and the reduction's
    scale 1/N or 1/M as a 1-element device tensor: static shapes, no host sync."""
    live = turn > 0
    ep = torch.where(live, episode, 0).long()
    cnt = torch.zeros(max(E, 1), dtype=torch.int32, device=turn.device)
    cnt.index_add_(0, ep, live.to(torch.int32))  # integer adds: exact in any order
    denom = live.sum() if reduction == "token_mean" else (cnt > 0).sum()
    return cnt, (1.0 / denom.clamp(min=1).to(torch.float32)).reshape(1)


def _clip_range(clip_eps) -> tuple[float, float]:
    """(1 - lo, 1 + hi) from eps or (lo, hi), each > 0 (lo < 1 keeps the floor positive)."""
    pair = (clip_eps, clip_eps) if isinstance(clip_eps, (int, float)) else clip_eps
    try:
        lo, hi = (float(x) for x in pair)
    except (TypeError, ValueError):
        lo = hi = float("nan")
    if not (0 < lo < 1 and hi > 0):
        raise ValueError(f"clip_eps must be eps or (lo, hi) with 0 < lo < 1 and hi > 0, "
                         f"got {clip_eps!r}")
    return 1.0 - float(lo), 1.0 + float(hi)


def score_loss_triton(logp, ref, old, turn, episode, adv, cnt, scale, stage, beta1, beta2,
                      kind, clip_eps, kl_ratio, per_episode):
    """The fp64 sums (STATS, in order) and the fp32 per-token gradient w_t dl_t/dlogp of
    the flat [T] inputs, from one launch of _score_loss_kernel."""
    n = logp.numel()
    grid = max(triton.cdiv(n, _BLOCK), 1)
    grad = torch.empty(n, dtype=torch.float32, device=logp.device)
    part = torch.empty(grid, len(STATS), dtype=torch.float32, device=logp.device)
    clip = clip_eps is not None
    # One compiled variant per flag combination, whatever the callers' dtypes: the kernel
    # sees fp32 floats and int32 ids (copies of [T] vectors, 32 KB at T = 8192); episode
    # ids and turn labels are range-checked in score_loss, and E < 2**31.
    logp, ref, adv = logp.float(), ref.float(), adv.float()
    old = logp if old is None else old.float()  # r = 1 when clipping without old_logp
    lo, hi = _clip_range(clip_eps) if clip else (0.0, 0.0)
    turn, episode = turn.to(torch.int32), episode.to(torch.int32)
    _score_loss_kernel[(grid,)](
        logp, ref, old, turn, episode, adv, cnt, scale, grad, part,
        n, adv.stride(0), adv.stride(1),
        float(beta1), float(beta2), lo, hi,
        STAGE=stage, KIND=kind, CLIP=clip, KL_RATIO=kl_ratio, PER_EPISODE=per_episode,
        NUM_STATS=len(STATS), BLOCK=_BLOCK, num_warps=_WARPS)
    return part.sum(0, dtype=torch.float64), grad


def score_loss_torch(logp, ref, old, turn, episode, adv, cnt, scale, stage, beta1, beta2,
                     kind, clip_eps, kl_ratio, per_episode):
    """The kernel's math in torch ops, with the same explicit gradients (no autograd graph)."""
    logp, ref = logp.float(), ref.float()
    t1, t2 = turn == 1, turn == 2
    live = t1 | t2
    ep = torch.where(live, episode, 0).long()
    adv = adv.float() if adv.shape[0] else adv.new_zeros(1, 2, dtype=torch.float32)  # E = 0
    a = torch.where(live, adv[ep, (turn - 1).clamp(0, 1).long()], 0.0)
    if clip_eps is not None:
        ratio = torch.exp(logp - (logp if old is None else old.float()))
        surr = ratio * a
        surr_clip = ratio.clamp(*_clip_range(clip_eps)) * a
        clipped = surr_clip < surr
        pg, dpg = -torch.minimum(surr, surr_clip), torch.where(clipped, 0.0, -surr)
    else:
        clipped = torch.zeros_like(live)
        pg, dpg = -a * logp, -a
    has_pg = t2 if stage == 1 else live
    beta = torch.where(t1, beta2, beta1) if stage == 1 else torch.full_like(logp, beta1)
    kl, dkl = kl_and_grad_torch(logp - ref, kind)
    klt, dklt = (kl * ratio, (dkl + kl) * ratio) if kl_ratio else (kl, dkl)
    w = scale / cnt[ep].float() if per_episode else scale.expand_as(logp)
    w = torch.where(live, w, 0.0)
    pg, dpg = torch.where(has_pg, pg, 0.0), torch.where(has_pg, dpg, 0.0)
    klt = torch.where(live, klt, 0.0)
    dklt = torch.where(live, dklt, 0.0)
    logp = torch.where(live, logp, 0.0)
    stats = torch.stack([
        (w * pg).sum(), (w * beta * klt).sum(),
        torch.where(t1, klt, 0.0).sum(), torch.where(t2, klt, 0.0).sum(),
        torch.where(t1, logp, 0.0).sum(), torch.where(t2, logp, 0.0).sum(),
        t1.sum(), t2.sum(), has_pg.sum(), (clipped & has_pg).sum()]).double()
    return stats, w * (dpg + beta * dklt)


class _ScoreLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logp, on_triton, *args):
        stats, grad = (score_loss_triton if on_triton else score_loss_torch)(logp, *args)
        ctx.save_for_backward(grad)
        ctx.dtype = logp.dtype
        loss = (stats[0] + stats[1]).to(torch.float32)
        stats = stats.to(torch.float32)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, dloss, _dstats):
        (grad,) = ctx.saved_tensors
        return (dloss * grad).to(ctx.dtype), None, *([None] * 14)


def score_metrics(stats: torch.Tensor, clip: bool) -> dict[str, torch.Tensor]:
    """The metrics of the module doc (detached 0-d tensors) from the sums in STATS order."""
    s = dict(zip(STATS, stats.detach().unbind()))
    n1, n2 = s["n1"].clamp(min=1), s["n2"].clamp(min=1)
    m = {"kl_t1": s["kl_sum1"] / n1, "kl_t2": s["kl_sum2"] / n2,
         "logp_t1": s["logp_sum1"] / n1, "logp_t2": s["logp_sum2"] / n2,
         "pg_loss": s["pg_loss"], "kl_loss": s["kl_loss"], "num_tokens": s["n1"] + s["n2"]}
    if clip:
        m["clip_frac"] = s["n_clipped"] / s["n_pg"].clamp(min=1)
    return m


def _shape_err(name, t, like_name, like):
    return ValueError(f"{name} shape {tuple(t.shape)} does not match "
                      f"{like_name} shape {tuple(like.shape)}")


def check_score_args(logp, ref_logp, turn, episode, advantages, stage, beta1, beta2, kl,
                     old_logp, clip_eps, reduction, kl_ratio=False):
    """score_loss's argument checks: free ones on stage, kl, reduction, betas, clip range,
    shapes and dtypes; with SCORE_FAST_CHECK_INPUTS on, the turn labels and episode ids
    (one sync on a GPU)."""
    if stage not in (1, 2):
        raise ValueError(f"stage must be 1 or 2, got {stage!r}")
    check_kind(kl)
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if beta1 < 0 or beta2 < 0:
        raise ValueError(f"beta1 and beta2 must be >= 0, got {beta1} and {beta2}")
    if old_logp is not None and clip_eps is None:
        raise ValueError("old_logp needs clip_eps (PPO-clip); REINFORCE takes neither")
    if clip_eps is not None:
        _clip_range(clip_eps)
    if kl_ratio and clip_eps is None:
        raise ValueError("kl_ratio weights the KL by the ratio r: it needs clip_eps (and "
                         "old_logp, or none for r = 1)")
    if not logp.is_floating_point():
        raise ValueError(f"logp must be floating point, got {logp.dtype}")
    for name, t in (("ref_logp", ref_logp), ("turn", turn), ("episode", episode),
                    ("old_logp", old_logp)):
        if t is not None and t.shape != logp.shape:
            raise _shape_err(name, t, "logp", logp)
    for name, t in (("turn", turn), ("episode", episode)):
        if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
            raise ValueError(f"{name} must be an integer tensor, got dtype {t.dtype}")
    if advantages.dim() != 2 or advantages.shape[1] != 2:
        raise ValueError(f"advantages must be [E, 2] (attempt 1, attempt 2), got shape "
                         f"{tuple(advantages.shape)}")
    if checks_enabled() and turn.numel():  # reads the data: one sync on a GPU
        live = turn > 0
        bad = torch.stack([((turn < 0) | (turn > 2)).any(),
                           (live & ((episode < 0) | (episode >= advantages.shape[0]))).any()])
        bad_turn, bad_ep = bad.tolist()
        if bad_turn:
            raise ValueError("turn values must be 0 (no loss), 1 or 2")
        if bad_ep:
            raise ValueError(f"episode out of range [0, {advantages.shape[0]}) on a token "
                             f"with turn > 0 (advantages shape {tuple(advantages.shape)})")


def score_loss(logp: torch.Tensor, ref_logp: torch.Tensor, turn: torch.Tensor,
               episode: torch.Tensor, advantages: torch.Tensor, *, stage: int,
               beta1: float = 0.01, beta2: float = 0.1, kl: str = "k3",
               old_logp: torch.Tensor | None = None,
               clip_eps: float | tuple[float, float] | None = None, kl_ratio: bool = False,
               reduction: str = "token_mean") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SCoRe loss (0-d fp32, differentiable in logp) and detached metrics; formulas in the
    module doc. logp, ref_logp, turn, episode (and old_logp): same shape, any layout
    ([1, T] packed or [B, T] padded). advantages: [E, 2] from score_advantages."""
    check_score_args(logp, ref_logp, turn, episode, advantages, stage, beta1, beta2, kl,
                     old_logp, clip_eps, reduction, kl_ratio)
    flat = lambda t: None if t is None else t.detach().contiguous().view(-1)  # noqa: E731
    turn_f, ep_f = flat(turn), flat(episode)
    cnt, scale = reduction_weights(turn_f, ep_f, advantages.shape[0], reduction)
    tensors = [t for t in (logp, ref_logp, turn, episode, advantages, old_logp) if t is not None]
    loss, stats = _ScoreLoss.apply(
        logp.contiguous().view(-1), use_triton(*tensors), flat(ref_logp), flat(old_logp),
        turn_f, ep_f, advantages.detach(), cnt, scale, stage, beta1, beta2, kl, clip_eps,
        bool(kl_ratio), reduction == "seq_mean_token_mean")
    return loss, score_metrics(stats, clip_eps is not None)


def score_loss_ref(logp, ref_logp, turn, episode, advantages, *, stage, beta1=0.01, beta2=0.1,
                   kl="k3", old_logp=None, clip_eps=None, kl_ratio=False,
                   reduction="token_mean"):
    """Plain-torch specification in logp's dtype (fp64-capable); autograd gives the gradient.
    Episode reductions loop over episodes in Python: an oracle, not a training path."""
    dt = logp.dtype
    logp, ref = logp.reshape(-1), ref_logp.detach().reshape(-1).to(dt)
    turn, episode = turn.reshape(-1), episode.reshape(-1)
    t1, t2 = turn == 1, turn == 2
    live = t1 | t2
    adv = advantages.detach().to(dt)
    a = torch.zeros_like(logp)
    a[live] = adv[episode[live], turn[live] - 1]
    if clip_eps is not None:
        old = logp if old_logp is None else old_logp.reshape(-1).to(dt)
        ratio = torch.exp(logp - old.detach())
        lo, hi = _clip_range(clip_eps)
        pg = -torch.minimum(ratio * a, torch.clamp(ratio, lo, hi) * a)
    else:
        pg = -a * logp
    has_pg = t2 if stage == 1 else live
    pg = torch.where(has_pg, pg, 0.0)
    beta = torch.where(t1 & (stage == 1), beta2, beta1).to(dt)
    klv = kl_penalty_ref(logp, ref, kl) * (ratio if kl_ratio else 1.0)
    klw = torch.where(live, beta * klv, 0.0)

    def reduce(x):
        if reduction == "token_mean":
            return x[live].sum() / max(int(live.sum()), 1)
        per_ep = [x[live & (episode == e)] for e in range(advantages.shape[0])]
        per_ep = [v.mean() if reduction == "seq_mean_token_mean" else v.sum()
                  for v in per_ep if v.numel()]
        return torch.stack(per_ep).mean() if per_ep else x.sum() * 0

    def mean(x, m):
        return x[m].mean() if m.any() else torch.zeros((), dtype=dt)

    pg_loss, kl_loss = reduce(pg), reduce(klw)
    metrics = {"kl_t1": mean(klv, t1), "kl_t2": mean(klv, t2), "logp_t1": mean(logp, t1),
               "logp_t2": mean(logp, t2), "pg_loss": pg_loss, "kl_loss": kl_loss,
               "num_tokens": live.sum().to(dt)}
    if clip_eps is not None:
        clipped = (torch.clamp(ratio, lo, hi) * a < ratio * a) & has_pg
        metrics["clip_frac"] = clipped.sum().to(dt) / max(int(has_pg.sum()), 1)
    return pg_loss + kl_loss, {k: v.detach() for k, v in metrics.items()}

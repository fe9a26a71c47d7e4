"""The SCoRe loss straight from hidden states and the LM-head weight, in one fused pass
that never holds the [N, V] logits.

    loss, metrics = linear_score_loss(hidden, weight, targets, ref_logp, turn, episode, adv,
                                      stage=2)
    == score_loss(linear_logprobs(hidden, weight, targets), ref_logp, turn, episode, adv,
                  stage=2)

with the same formulas, reductions, edge cases and metrics dict as score_loss.py, plus
entropy_t1 / entropy_t2: the policy's entropy (of softmax(logits / T)) averaged over each
attempt's loss rows, from sums the log-sum-exp sweep keeps anyway. The loss
is a sum of per-token terms, loss = sum_t w_t l_t(logp_t), so with g_t = w_t dl_t/dlogp_t
(what score_loss's kernel writes per token; it depends on logp_t and per-token constants
only) and D[t, v] = g_t (onehot(target_t)_v - p[t, v]) / T (_lmhead.py):

    dloss/dhidden = D @ weight,   dloss/dweight = D.T @ hidden,   dloss/dbias = D.sum(0)

Design (documented choices):
  * Gradients are computed in the forward, when grad mode is on and hidden, weight or bias
    requires grad (as fused-linear losses do), and saved as fp32 tensors; backward scales
    them by the upstream scalar into new tensors of the inputs' dtypes, so it may run again
    (retain_graph=True). With 16-bit inputs the scaled gradient is written in that dtype
    directly (torch.mul's out=, no fp32 temporary); with fp32 weights backward holds the
    fp32 dweight [V, H] twice for a moment (2.5 GB at 151936 x 4096). Under no_grad, or
    with nothing requiring grad, no gradient work is done.
  * Row selection: only tokens with turn > 0 do vocabulary work: `rows` when the caller
    has them (the trainer, from the host), else turn.nonzero() (one host sync on a GPU: the
    GEMMs need their row count).
  * Triton backend (_lmhead's row_sweep, issue 30): chunks of up to 2048 loss rows, each
    through the whole vocabulary: z = h_R W^T (fp32, cuBLAS), the log-sum-exp kernel,
    score_loss's Triton kernel on the chunk (g), D written over z in 16 bits, then
    dh_R = D W and dW += D^T h_R (fp32 C): 3 GEMM passes of 2 N_loss H V flops, as eager
    autograd, against the vocabulary sweep's 4 (it recomputed z). The weight gradient is
    fp32 (scaled by the upstream in backward, then cast).
  * PyTorch (_lmhead's cpu_sweep): one sweep over fixed 256-row chunks of the loss rows; per
    chunk the logit tile(s), the log-sum-exp, score_loss's per-token math on the chunk (its
    metric sums are added across chunks in fp64), then D and the three gradient products.
    When the vocabulary is a single chunk (V <= 32768) the tile is reused, not recomputed:
    3 matmul passes, as many as eager autograd.
  * Sync points: none given `rows` and with the value checks off (the trainer's calls);
    else the loss-row count, and the input value checks shared with score_loss and
    linear_logprobs (targets range, turn/episode labels: one sync each;
    SCORE_FAST_CHECK_INPUTS=0 or kernels._dispatch.unchecked() skips them).
"""
from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from ._common import check_temperature
from ._dispatch import use_triton
from ._lmhead import check_head, cpu_sweep, flatten_head, row_sweep
from .linear_logprobs import linear_logprobs_ref
from .score_loss import (STATS, check_score_args, reduction_weights, score_loss_ref,
                         score_loss_torch, score_loss_triton, score_metrics)

__all__ = ["linear_score_loss", "linear_score_loss_ref"]


def _entropy_sums(ent, turn):
    """fp64 [2]: the policy's entropy summed over the attempt-1 and attempt-2 loss rows."""
    t = turn.long()
    return torch.zeros(3, dtype=torch.float64, device=ent.device).index_add_(
        0, t, ent.double())[1:]


def _loss_and_grads(h, w, b, t, inv_t, on_triton, need_dh, need_dw, score_args, rows=None):
    """Loss statistics (fp64 [len(STATS) + 2]: score_loss's, then the entropy sums per
    attempt) and fp32 gradients dh, dw, db (None where not needed). score_args: the flat
    (ref, old, turn, episode, advantages, cnt, scale, stage, beta1, beta2, kl, clip_eps,
    kl_ratio, per_episode) of score_loss_triton / score_loss_torch after logp."""
    ref, old, turn, ep, adv, cnt, scale, *loss_args = score_args
    if rows is None:  # the loss rows (a nonzero: one sync on a GPU)
        rows = (turn > 0).nonzero().squeeze(1)
    parts = []
    score = score_loss_triton if on_triton else score_loss_torch

    def grad_of(idx, lp):
        sel = lambda a: None if a is None else a.index_select(0, idx)  # noqa: E731
        st, g = score(lp, sel(ref), sel(old), sel(turn), sel(ep), adv, cnt, scale, *loss_args)
        parts.append(st)
        return g if (need_dh or need_dw) else None

    sweep = row_sweep if on_triton else cpu_sweep
    _, _, _, ent, dh, dw, db = sweep(h, w, b, t, rows, inv_t, grad_of=grad_of,
                                     need_dh=need_dh, need_dw=need_dw, entropy=True)
    stats = torch.zeros(len(STATS), dtype=torch.float64, device=h.device)
    for st in parts:  # chunk order is fixed: a deterministic fp64 sum
        stats += st
    return torch.cat([stats, _entropy_sums(ent, turn)]), dh, dw, db


def _scaled(grad, dloss, dtype):
    """grad * dloss in `dtype`, written straight into a tensor of that dtype: no fp32
    temporary of a 16-bit [V, H] gradient."""
    if grad is None:
        return None
    return torch.mul(grad, dloss, out=torch.empty(grad.shape, dtype=dtype, device=grad.device))


class _LinearScoreLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, t, inv_t, on_triton, need, score_args, rows):
        stats, dh, dw, db = _loss_and_grads(h, w, b, t, inv_t, on_triton, *need, score_args,
                                            rows)
        ctx.save_for_backward(dh, dw, db)  # fp32, unscaled: backward may run more than once
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        loss = (stats[0] + stats[1]).to(torch.float32)
        stats = stats.to(torch.float32)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    @once_differentiable  # the saved gradients are constants to autograd
    def backward(ctx, dloss, _dstats):
        grads = [_scaled(g, dloss, dt) for g, dt in zip(ctx.saved_tensors, ctx.dtypes)]
        return *grads, None, None, None, None, None, None


def linear_score_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      ref_logp: torch.Tensor, turn: torch.Tensor, episode: torch.Tensor,
                      advantages: torch.Tensor, *, stage: int, beta1: float = 0.01,
                      beta2: float = 0.1, kl: str = "k3", bias: torch.Tensor | None = None,
                      temperature: float = 1.0, reduction: str = "token_mean",
                      old_logp: torch.Tensor | None = None,
                      clip_eps: float | tuple[float, float] | None = None,
                      kl_ratio: bool = False, rows: torch.Tensor | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SCoRe loss (0-d fp32, differentiable in hidden, weight and bias) and detached metrics,
    equal to score_loss(linear_logprobs(hidden, weight, targets, bias=bias,
    temperature=temperature), ref_logp, turn, episode, advantages, ...).

    hidden [..., H], weight [V, H] (same float dtype), bias [V] or None; targets, ref_logp,
    turn, episode (and old_logp): shape hidden.shape[:-1]; advantages [E, 2]. stage, beta1,
    beta2, kl, reduction, old_logp, clip_eps, kl_ratio: as in score_loss. rows: the int64
    flat indices of the rows with turn > 0, ascending, where the caller has them (the trainer
    does, from the host): else found on the device (a sync on a GPU). Design in the module
    doc."""
    check_head(hidden, weight, bias, targets)
    inv_t = check_temperature(temperature)
    for name, a in (("ref_logp", ref_logp), ("turn", turn), ("episode", episode),
                    ("old_logp", old_logp)):
        if a is not None and (not isinstance(a, torch.Tensor)
                              or tuple(a.shape) != tuple(targets.shape)):
            raise ValueError(f"{name} shape {tuple(getattr(a, 'shape', ()))} does not match "
                             f"targets shape {tuple(targets.shape)} (hidden shape "
                             f"{tuple(hidden.shape)})")
    for name, a in (("ref_logp", ref_logp), ("old_logp", old_logp)):
        if a is not None and not a.is_floating_point():
            raise ValueError(f"{name} must be floating point, got {a.dtype}")
    if not isinstance(advantages, torch.Tensor):
        raise ValueError(f"advantages must be an [E, 2] tensor, got {type(advantages).__name__}")
    flat = lambda a: None if a is None else a.detach().reshape(-1).contiguous()  # noqa: E731
    turn_f, ep_f = flat(turn), flat(episode)
    # score_loss's own checks: stage, kl, reduction, betas, clip, labels, advantages shape
    check_score_args(torch.empty(turn_f.shape, device=turn_f.device), ref_logp.reshape(-1),
                     turn_f, ep_f, advantages, stage, beta1, beta2, kl,
                     None if old_logp is None else old_logp.reshape(-1), clip_eps, reduction,
                     kl_ratio)
    h, w, b, t = flatten_head(hidden, weight, targets, bias)
    cnt, scale = reduction_weights(turn_f, ep_f, advantages.shape[0], reduction)
    tensors = [a for a in (hidden, weight, targets, bias, ref_logp, turn, episode, advantages,
                           old_logp) if a is not None]
    grad_on = torch.is_grad_enabled()
    need = (grad_on and hidden.requires_grad,
            grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad)))
    score_args = (flat(ref_logp), flat(old_logp), turn_f, ep_f, advantages.detach(), cnt,
                  scale, stage, beta1, beta2, kl, clip_eps, bool(kl_ratio),
                  reduction == "seq_mean_token_mean")
    if rows is not None and (rows.dtype != torch.int64 or rows.dim() != 1
                             or rows.device != turn_f.device):
        raise ValueError(f"rows must be int64 [R] on {turn_f.device}, got {rows.dtype} "
                         f"{tuple(rows.shape)} on {rows.device}")
    loss, stats = _LinearScoreLoss.apply(h, w, b, t, inv_t, use_triton(*tensors), need,
                                         score_args, rows)
    metrics = score_metrics(stats[:len(STATS)], clip_eps is not None)
    # the policy's entropy at the loss rows (its sampling distribution at temperature T),
    # from the log-sum-exp sweep's own sums: no extra pass over the vocabulary
    n = stats[STATS.index("n1"):STATS.index("n2") + 1].clamp(min=1)
    metrics["entropy_t1"], metrics["entropy_t2"] = (stats[len(STATS):] / n).unbind()
    return loss, metrics


def linear_score_loss_ref(hidden, weight, targets, ref_logp, turn, episode, advantages, *,
                          stage, beta1=0.01, beta2=0.1, kl="k3", bias=None, temperature=1.0,
                          reduction="token_mean", old_logp=None, clip_eps=None,
                          kl_ratio=False):
    """The specification and test oracle in the inputs' dtype (fp64 in the tests): the full
    logits, token log-probabilities, then score_loss_ref; autograd gives the gradients."""
    logp = linear_logprobs_ref(hidden, weight, targets, bias, temperature)
    loss, metrics = score_loss_ref(logp, ref_logp, turn, episode, advantages, stage=stage,
                                   beta1=beta1, beta2=beta2, kl=kl, old_logp=old_logp,
                                   clip_eps=clip_eps, kl_ratio=kl_ratio, reduction=reduction)
    with torch.no_grad():  # the entropy of softmax(x / T) per row, mean per attempt
        x = (hidden @ weight.T + (0 if bias is None else bias)) / temperature
        lsm = torch.log_softmax(x, -1)
        ent = -torch.where(lsm > float("-inf"), lsm.exp() * lsm, 0.0).sum(-1).reshape(-1)
        ent = ent.nan_to_num(0.0)  # an all -inf row
        for k in (1, 2):
            sel = turn.reshape(-1) == k
            metrics[f"entropy_t{k}"] = ent[sel].sum() / max(int(sel.sum()), 1)
    return loss, metrics

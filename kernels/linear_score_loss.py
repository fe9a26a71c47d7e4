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
only) and D[t, v] = g_t (onehot(target_t)_v - p[t, v]) / T (linear_logprobs.py):

    dloss/dhidden = D @ weight,   dloss/dweight = D.T @ hidden,   dloss/dbias = D.sum(0)

Design (documented choices):
  * Gradients are computed EAGERLY in the forward, when grad mode is on and hidden, weight
    or bias requires grad (as fused-linear losses do): backward only scales the saved
    gradients by the upstream scalar, in place, so it may run once (a second backward
    raises). Under no_grad, or with nothing requiring grad, no gradient work is done.
  * Row selection: only tokens with turn > 0 do vocabulary work. Triton backend:
    turn.nonzero() (ONE host sync: the GEMMs need their row count); PyTorch path: the same
    (free on a CPU).
  * Triton backend (linear_logprobs.py's module doc): the loss rows are gathered, pass 1 =
    the chunked log-sum-exp (logp, M, log S), score_loss's Triton kernel (g), pass 2 =
    recompute + the three gradient products per vocabulary chunk. 4 matmul passes of
    2 N_loss H V flops, all cuBLAS; the weight gradient is fp32 (scaled by the upstream in
    backward, then cast).
  * PyTorch: one sweep over fixed 256-row chunks of the loss rows; per chunk the logit
    tile(s), the log-sum-exp, score_loss's per-token math on the chunk (its metric sums
    are added across chunks in fp64), then D and the three gradient products. When the
    vocabulary is a single chunk (V <= 32768) the tile is reused, not recomputed: 3 matmul
    passes, as many as eager autograd.
  * Sync points: one on the Triton backend (the loss-row count), besides the input value
    checks shared with score_loss and linear_logprobs (targets range, turn/episode labels:
    one sync each; SCORE_FAST_CHECK_INPUTS=0 skips them).
"""
from __future__ import annotations

import torch

from ._dispatch import use_triton
from .linear_logprobs import (_bwd_chunked, _check_inputs, _cpu_pass, _fwd_chunked,
                              _prepare, linear_logprobs_ref)
from .score_loss import (_STATS, _check, _metrics, _score_loss_torch, _score_loss_triton,
                         _weights, score_loss_ref)
from .token_logprobs import _check_temperature

__all__ = ["linear_score_loss", "linear_score_loss_ref"]


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


def _entropy_sums(ent, turn):
    """fp64 [2]: the policy's entropy summed over the attempt-1 and attempt-2 loss rows."""
    t = turn.long()
    return torch.zeros(3, dtype=torch.float64, device=ent.device).index_add_(
        0, t, ent.double())[1:]


def _run(h, w, b, t, ref, old, turn, ep, adv, cnt, scale, loss_args, inv_t, on_triton,
         need_dh, need_dw):
    """Loss statistics (fp64 [len(_STATS) + 2]: score_loss's, then the entropy sums per
    attempt) and fp32 gradients (None where not needed)."""
    rows = (turn > 0).nonzero().squeeze(1)  # the loss rows
    if on_triton:
        logp, m, log_s, ent = _fwd_chunked(h, w, b, t, rows, inv_t)
        stats, g = _score_loss_triton(logp, ref, old, turn, ep, adv, cnt, scale, *loss_args)
        dh = dw = db = None
        if need_dh or need_dw:  # fp32 dweight: backward scales it by the upstream first
            dh, dw, db = _bwd_chunked(h, w, b, t, rows, m, log_s, g, inv_t, need_dh, need_dw)
        return torch.cat([stats, _entropy_sums(ent, turn)]), dh, dw, db
    parts = []

    def grad_of(_chunk, idx, lp):
        sel = lambda a: None if a is None else a.index_select(0, idx)  # noqa: E731
        st, g = _score_loss_torch(lp, sel(ref), sel(old), sel(turn), sel(ep), adv, cnt,
                                  scale, *loss_args)
        parts.append(st)
        return g if (need_dh or need_dw) else None

    _, _, _, ent, dh, dw, db = _cpu_pass(h, w, b, t, rows, inv_t, grad_of=grad_of,
                                         need_dh=need_dh, need_dw=need_dw, entropy=True)
    stats = torch.zeros(len(_STATS), dtype=torch.float64, device=h.device)
    for st in parts:  # chunk order is fixed: a deterministic fp64 sum
        stats += st
    return torch.cat([stats, _entropy_sums(ent, turn)]), dh, dw, db


class _LinearScoreLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, b, run):
        stats, dh, dw, db = run()
        ctx.grads = (dh, dw, db)
        ctx.dtypes = (h.dtype, w.dtype, None if b is None else b.dtype)
        loss = (stats[0] + stats[1]).to(torch.float32)
        stats = stats.to(torch.float32)
        ctx.mark_non_differentiable(stats)
        return loss, stats

    @staticmethod
    def backward(ctx, dloss, _dstats):
        if ctx.grads is None:
            raise RuntimeError("linear_score_loss computes its gradients in the forward and "
                               "scales them in place: backward can run once per forward")
        out = []
        for grad, dtype in zip(ctx.grads, ctx.dtypes):
            # in place: the fp32 weight gradient is V x H (2.5 GB at 151936 x 4096)
            out.append(None if grad is None else grad.mul_(dloss).to(dtype))
        ctx.grads = None
        return *out, None


def linear_score_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                      ref_logp: torch.Tensor, turn: torch.Tensor, episode: torch.Tensor,
                      advantages: torch.Tensor, *, stage: int, beta1: float = 0.01,
                      beta2: float = 0.1, kl: str = "k3", bias: torch.Tensor | None = None,
                      temperature: float = 1.0, reduction: str = "token_mean",
                      old_logp: torch.Tensor | None = None,
                      clip_eps: float | tuple[float, float] | None = None,
                      kl_ratio: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """SCoRe loss (0-d fp32, differentiable in hidden, weight and bias) and detached metrics,
    equal to score_loss(linear_logprobs(hidden, weight, targets, bias=bias,
    temperature=temperature), ref_logp, turn, episode, advantages, ...).

    hidden [..., H], weight [V, H] (same float dtype), bias [V] or None; targets, ref_logp,
    turn, episode (and old_logp): shape hidden.shape[:-1]; advantages [E, 2]. stage, beta1,
    beta2, kl, reduction, old_logp, clip_eps, kl_ratio: as in score_loss. Design in the module
    doc."""
    _check_inputs(hidden, weight, targets, bias)
    inv_t = _check_temperature(temperature)
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
    _check(torch.empty(turn_f.shape, device=turn_f.device), ref_logp.reshape(-1), turn_f,
           ep_f, advantages, stage, beta1, beta2, kl,
           None if old_logp is None else old_logp.reshape(-1), clip_eps, reduction, kl_ratio)
    h, w, b, t = _prepare(hidden, weight, targets, bias)
    cnt, scale = _weights(turn_f, ep_f, advantages.shape[0], reduction)
    tensors = [a for a in (hidden, weight, targets, bias, ref_logp, turn, episode, advantages,
                           old_logp) if a is not None]
    on_triton = use_triton(*tensors)
    grad_on = torch.is_grad_enabled()
    need_dh = grad_on and hidden.requires_grad
    need_dw = grad_on and (weight.requires_grad or (bias is not None and bias.requires_grad))
    loss_args = (stage, beta1, beta2, kl, clip_eps, bool(kl_ratio),
                 reduction == "seq_mean_token_mean")

    def run():
        return _run(h, w, b, t, flat(ref_logp), flat(old_logp), turn_f, ep_f,
                    advantages.detach(), cnt, scale, loss_args, inv_t, on_triton, need_dh,
                    need_dw)

    loss, stats = _LinearScoreLoss.apply(h, w, b, run)
    metrics = _metrics(stats[:len(_STATS)], clip_eps is not None)
    # the policy's entropy at the loss rows (its sampling distribution at temperature T),
    # from the log-sum-exp sweep's own sums: no extra pass over the vocabulary
    n = stats[_STATS.index("n1"):_STATS.index("n2") + 1].clamp(min=1)
    metrics["entropy_t1"], metrics["entropy_t2"] = (stats[len(_STATS):] / n).unbind()
    return loss, metrics

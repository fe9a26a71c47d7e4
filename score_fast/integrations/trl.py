"""score_fast's fused linear policy loss inside TRL's GRPOTrainer (TRL >= 1.16).

    from score_fast.integrations.trl import FusedGRPOTrainer
    trainer = FusedGRPOTrainer(model=model, reward_funcs=reward, args=GRPOConfig(...),
                               train_dataset=dataset)   # what you would pass GRPOTrainer
    trainer.train()

FusedGRPOTrainer is GRPOTrainer with its loss replaced: the policy's last hidden states go
straight into linear_score_loss (LM head + log-softmax + GRPO objective + KL + gradients in
one pass over vocabulary tiles, never the [B, T, V] logits), so generation, rewards,
advantages, the reference model, logging and checkpoints stay TRL's. The loss value and
its gradients are TRL's own (tests/test_trl.py holds them to the 2x accuracy rule against
an fp64 run of TRL's loss):

    per token  l_t = -min(r A, clip(r, 1 - eps_low, 1 + eps_high) A) + beta k3(ref, logp)
    r = exp(logp - old_logp), or r = 1 (old_logp = logp) when TRL computes no old log-probs
    k3 = exp(ref - logp) - (ref - logp) - 1, times r when use_bias_correction_kl (TRL's
         default: the KL's gradient becomes r * (logp - ref), even on-policy where r = 1)

with TRL's loss_type reductions over the completion mask (grpo: per-sequence mean then the
mean over sequences; bnpo: token mean; dr_grpo: token sum / (B * max_completion_length);
dapo: token sum / TRL's num_items_in_batch normaliser) and its gradient-accumulation
scaling. This is the caller the loss API's asymmetric clip (clip_eps=(lo, hi)), the
on-policy ratio (clip_eps without old_logp) and kl_ratio exist for.

How: linear_score_loss trains tokens with turn > 0. A GRPO batch is one attempt per row:
turn = the completion mask (1), episode = the row, advantages [B] -> the [B, 2] table's
first column, stage 2 (policy gradient on every turn-1 token), beta1 = beta, kl = "k3".

Metrics: TRL's "kl", "entropy" (at the sampling temperature, from the loss's log-sum-exp
sweep) and "clip_ratio/region_mean"; the low/high clip split is not kept by the fused op.

The loss runs inside the model's forward (a `score_fast_grpo=` keyword added on top of
TRL's own forward patch), so DDP and FSDP wrappers see an ordinary forward call.

Refused with a clear error (TRL options the fused op does not implement): loss types
cispo, sapo, vespo, luspo; importance_sampling_level="sequence"; top_entropy_quantile < 1;
off_policy_mask_threshold; delta (two-sided clip); vLLM importance-sampling correction;
the entropy bonus; MoE auxiliary losses; logit soft-capping or scaling; vision inputs.
"""
from __future__ import annotations

import torch

from score_fast.kernels.linear_score_loss import linear_score_loss

try:
    from trl import GRPOTrainer
except ImportError as e:  # the integration is optional; the library never imports it
    raise ImportError("score_fast.integrations.trl needs TRL >= 1.16: "
                      "pip install 'score_fast[trl]'") from e

__all__ = ["FusedGRPOTrainer", "grpo_loss", "LOSS_TYPES"]

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")


def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, completion_ids: torch.Tensor,
              completion_mask: torch.Tensor, advantages: torch.Tensor, *,
              ref_logp: torch.Tensor | None = None, old_logp: torch.Tensor | None = None,
              beta: float = 0.0, epsilon_low: float = 0.2, epsilon_high: float | None = None,
              loss_type: str = "dapo", use_bias_correction_kl: bool = True,
              temperature: float = 1.0,
              max_completion_length: int | None = None,
              normalizer: torch.Tensor | float | None = None,
              bias: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """TRL's GRPO loss (before gradient-accumulation scaling) from hidden states.

    hidden [B, T, H]: the states that predict completion_ids [B, T] (position t - 1's);
    weight [V, H] (bias [V]): the LM head; completion_mask [B, T] (1 = trained token);
    advantages [B]; ref_logp, old_logp [B, T] or None (beta must be 0 without ref_logp;
    old_logp None = on-policy, r = 1). normalizer: dapo's divisor (default: the number of
    masked tokens). Defaults are GRPOConfig's. Returns (loss, metrics), the metrics
    linear_score_loss's."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if hidden.dim() != 3 or tuple(completion_ids.shape) != tuple(hidden.shape[:2]):
        raise ValueError(f"hidden must be [B, T, H] and completion_ids [B, T], got shapes "
                         f"{tuple(hidden.shape)} and {tuple(completion_ids.shape)}")
    if tuple(completion_mask.shape) != tuple(completion_ids.shape):
        raise ValueError(f"completion_mask shape {tuple(completion_mask.shape)} does not match "
                         f"completion_ids shape {tuple(completion_ids.shape)}")
    B, T = completion_ids.shape
    if advantages.dim() == 2 and advantages.shape[1] == 1:
        advantages = advantages[:, 0]
    if tuple(advantages.shape) != (B,):
        raise ValueError(f"advantages must be [B] = [{B}] (one per completion), got shape "
                         f"{tuple(advantages.shape)}")
    if ref_logp is None and beta != 0.0:
        raise ValueError(f"beta = {beta} needs ref_logp (the reference's per-token log-probs)")
    if loss_type == "dr_grpo" and not max_completion_length:
        raise ValueError("loss_type='dr_grpo' needs max_completion_length")
    live = completion_mask > 0
    turn = live.to(torch.int32)
    episode = torch.arange(B, device=hidden.device, dtype=torch.int32)[:, None].expand(B, T)
    adv = torch.stack([advantages.detach().float(), torch.zeros_like(advantages.float())], 1)
    if ref_logp is None:
        ref_logp = torch.zeros(B, T, device=hidden.device)
    reduction = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean",
                 "dr_grpo": "seq_mean_token_sum", "dapo": "token_mean"}[loss_type]
    # one dtype for the matmuls: the wider of the two (TRL's cast_lm_head_to_fp32 keeps an
    # fp32 head under a bf16 body)
    dt = torch.promote_types(hidden.dtype, weight.dtype)
    loss, metrics = linear_score_loss(
        hidden.to(dt), weight.to(dt), completion_ids, ref_logp, turn, episode, adv, stage=2,
        beta1=beta, kl="k3", bias=None if bias is None else bias.to(dt),
        temperature=temperature, reduction=reduction, old_logp=old_logp,
        clip_eps=(epsilon_low, epsilon_low if epsilon_high is None else epsilon_high),
        kl_ratio=use_bias_correction_kl and beta != 0.0)
    # TRL's reductions from ours: ours average over the M rows with a token (grpo) or sum
    # per row then average over M (dr_grpo); TRL divides by all B rows (and by the longest
    # allowed completion), dapo by its own token count. Scaling the loss scales the
    # gradients (backward multiplies by the upstream).
    rows = live.any(1).sum().clamp(min=1).to(torch.float32)
    if loss_type == "grpo":
        loss = loss * (rows / B)
    elif loss_type == "dr_grpo":
        loss = loss * (rows / (B * max_completion_length))
    elif loss_type == "dapo" and normalizer is not None:
        n = live.sum().clamp(min=1).to(torch.float32)
        loss = loss * (n / torch.as_tensor(normalizer, dtype=torch.float32,
                                           device=loss.device).clamp(min=1.0))
    return loss, metrics


def _refuse_unsupported(trainer) -> None:
    args = trainer.args
    cfg = trainer.model.config.get_text_config()
    checks = [
        (trainer.loss_type not in LOSS_TYPES,
         f"loss_type={trainer.loss_type!r} (supported: {', '.join(LOSS_TYPES)})"),
        (trainer.importance_sampling_level != "token",
         f"importance_sampling_level={trainer.importance_sampling_level!r}"),
        (trainer.top_entropy_quantile < 1.0,
         f"top_entropy_quantile={trainer.top_entropy_quantile}"),
        (trainer.off_policy_mask_threshold is not None,
         f"off_policy_mask_threshold={trainer.off_policy_mask_threshold}"),
        (getattr(args, "delta", None) is not None, f"delta={getattr(args, 'delta', None)}"),
        (trainer.use_vllm and trainer.vllm_importance_sampling_correction,
         "vllm_importance_sampling_correction=True (set it False to use the fused loss)"),
        (trainer._entropy_bonus_enabled, "an entropy bonus (entropy_coef / adaptive)"),
        (trainer.aux_loss_enabled, "a MoE router auxiliary loss"),
        (getattr(cfg, "final_logit_softcapping", None) is not None, "logit soft-capping"),
        (any(getattr(cfg, k, None) not in (None, 1, 1.0) for k in
             ("logit_scale", "output_multiplier", "lm_head_multiplier", "logits_scaling")),
         "scaled logits"),
    ]
    bad = [what for hit, what in checks if hit]
    if bad:
        raise ValueError("FusedGRPOTrainer does not implement " + "; ".join(bad)
                         + ": use trl.GRPOTrainer for these")


class FusedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer whose loss is score_fast's fused linear GRPO loss (module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _refuse_unsupported(self)
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        inner = base.forward

        def forward(*a, score_fast_grpo=None, **kw):
            if score_fast_grpo is None:
                return inner(*a, **kw)
            kw["use_cache"] = False
            spec = dict(score_fast_grpo)
            n = spec["completion_ids"].shape[1]
            # position t - 1 predicts token t: the n states before each completion token
            hidden = base.get_decoder()(*a, **kw).last_hidden_state[:, -n - 1:-1]
            head = base.get_output_embeddings()
            device = hidden.device.type
            if not torch.is_autocast_enabled(device):
                return grpo_loss(hidden, head.weight, bias=head.bias, **spec)
            # mixed precision (GRPOConfig's bf16 default): the LM head in the autocast
            # dtype, as TRL's own loss does, in the fused op's own casts
            dt = torch.get_autocast_dtype(device)
            with torch.autocast(device, enabled=False):
                return grpo_loss(hidden.to(dt), head.weight.to(dt), bias=None if head.bias is
                                 None else head.bias.to(dt), **spec)

        base.forward = forward

    def _compute_loss(self, model, inputs):
        if any(inputs.get(k) is not None for k in ("pixel_values", "image_grid_thw")):
            raise ValueError("FusedGRPOTrainer does not implement vision inputs: use "
                             "trl.GRPOTrainer")
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        mask = completion_mask if "tool_mask" not in inputs else (
            completion_mask * inputs["tool_mask"])
        mode = "train" if self.model.training else "eval"
        accum = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        normalizer = None
        if self.loss_type == "dapo":  # TRL's: the generation batch's tokens, per window
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / (
                self.accelerator.num_processes)
            if mode == "train":
                normalizer = normalizer * accum / self.args.steps_per_generation
        spec = dict(completion_ids=completion_ids, completion_mask=mask,
                    advantages=inputs["advantages"],
                    ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
                    old_logp=inputs.get("old_per_token_logps"), beta=self.beta,
                    epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                    loss_type=self.loss_type, temperature=self.temperature,
                    use_bias_correction_kl=self.args.use_bias_correction_kl,
                    max_completion_length=self.max_completion_length, normalizer=normalizer)
        loss, m = model(input_ids=torch.cat([inputs["prompt_ids"], completion_ids], 1),
                        attention_mask=torch.cat([inputs["prompt_mask"], completion_mask], 1),
                        score_fast_grpo=spec)
        if self.loss_type != "dapo":  # dapo's normalizer already spans the window
            loss = loss / accum
        n = mask.sum().float()
        sums = [m["entropy_t1"] * n, m["clip_frac"] * n, n]
        if self.beta != 0.0:
            sums.append(m["kl_t1"] * n)
        tot = self.accelerator.reduce(torch.stack(sums).to(loss.device), reduction="sum")
        count = tot[2].clamp(min=1.0)
        self._metrics[mode]["entropy"].append((tot[0] / count).item())
        self._metrics[mode]["clip_ratio/region_mean"].append((tot[1] / count).item())
        if self.beta != 0.0:
            self._metrics[mode]["kl"].append((tot[3] / count).item())
        return loss

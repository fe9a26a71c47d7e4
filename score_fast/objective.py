"""What one training step optimises (trainer.py's step, see its module doc): the stage
schedule, the Objective the config selects (the paper's Stage I / Stage II or a Table 4
ablation), the per-token tensors of a packed micro-batch, and the two fused passes over a
prepared model (score_fast.models.prepare_model): policy_loss and reference_logprobs, plain
functions of the model (nothing is bound to it)."""
from __future__ import annotations

import contextlib
import dataclasses
import inspect

import torch

import score_fast as sf
from score_fast import distributed
from score_fast.attention import packed_mask
from score_fast.config import Config, check_kl
from score_fast.models import is_lora, lora_base

__all__ = ["Objective", "plan_objective", "stage_at", "build_step_tensors", "policy_loss",
           "reference_logprobs"]


def stage_at(config: Config, step: int) -> int:
    """Stage (1 or 2) of 0-based step `step`: n1 Stage I steps, n2 Stage II, `rounds` times."""
    n1 = config.stage1.steps
    return 1 if step % (n1 + config.stage2.steps) < n1 else 2


@dataclasses.dataclass(frozen=True)
class Objective:
    """What one step trains, the whole loss specification: advantages [E, 2] (attempt 1,
    attempt 2), which (episode, attempt) pairs are trained at all ([E, 2] bool; the others'
    tokens get turn 0), the loss's stage and KL weights (stage 1: beta2 KL and no policy
    gradient on attempt 1; stage 2: policy gradient + beta1 KL on both attempts), the KL
    estimator (score_loss's kind: train.kl through config.check_kl), the reduction and the
    temperature the log-probs are taken at (the sampler's). plan_objective fills every
    field from the config; the trainer adds nothing."""
    adv: torch.Tensor
    train: torch.Tensor
    stage: int
    beta1: float
    beta2: float
    kl: str = "k2"
    reduction: str = "token_mean"
    temperature: float = 1.0

    def loss_kwargs(self) -> dict:
        """linear_score_loss's keywords of this objective."""
        return dict(stage=self.stage, beta1=self.beta1, beta2=self.beta2, kl=self.kl,
                    reduction=self.reduction, temperature=self.temperature)


def plan_objective(config: Config, stage: int, r1: torch.Tensor, r2: torch.Tensor | None,
                   group: torch.Tensor) -> Objective:
    """The step's objective, the paper's (Stage I / Stage II) or one of the Table 4
    ablations the config selects (train.single_turn, stage2.method = star). r2 is not read
    for single_turn (its steps sample no attempt 2: pass None)."""
    train = config.train
    n_episodes = len(r1)
    both = torch.ones(n_episodes, 2, dtype=torch.bool)
    spec = dict(kl=check_kl(train.kl), reduction=train.reduction,
                temperature=config.rollout.temperature)
    if train.single_turn:  # REINFORCE on attempt 1 with its own reward, every step
        adv = sf.score_advantages(r1, r1, group, stage=2, alpha=0.0, baseline=train.baseline,
                                  normalize=train.normalize)
        first_only = torch.tensor([[True, False]]).expand(n_episodes, 2)
        return Objective(adv, first_only, 2, config.stage2.beta1, 0.0, **spec)
    if stage == 2 and config.stage2.method == "star":  # SFT on own wrong -> right corrections
        fixed = (r1 <= 0) & (r2 > 0)
        adv = torch.zeros(n_episodes, 2)
        adv[:, 1] = 1.0  # REINFORCE with advantage 1 and no KL = the NLL gradient
        trained = torch.stack([torch.zeros_like(fixed), fixed], 1)
        return Objective(adv, trained, 2, 0.0, 0.0, **spec)
    adv = sf.score_advantages(r1, r2, group, stage=stage, alpha=config.stage2.alpha,
                              baseline=train.baseline, normalize=train.normalize)
    beta1 = config.stage1.beta1 if stage == 1 else config.stage2.beta1
    return Objective(adv, both, stage, beta1, config.stage1.beta2, **spec)


def build_step_tensors(batch, train: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """targets, turn, episode (each [T]) of one packed micro-batch; see trainer.py's module
    doc. train: optional [E, 2] bool (Objective.train); untrained attempts' rows get turn 0."""
    ids = batch.input_ids[0]
    seg = batch.segment_ids[0]
    lengths = batch.cu_seqlens.diff().long()
    last = batch.cu_seqlens[1:].long() - 1
    targets = torch.roll(ids, -1).clone()
    turn = torch.roll(seg, -1).clone()
    targets[last] = 0  # no next token: the row gets turn 0 and is never scored
    turn[last] = 0
    episode = torch.repeat_interleave(batch.seq_index, lengths)
    if train is not None:
        keep = torch.cat([torch.zeros(len(train), 1, dtype=torch.bool), train], 1)
        turn = torch.where(keep[episode, turn.long()], turn, torch.zeros_like(turn))
    return {"targets": targets, "turn": turn, "episode": episode}


def _last_hidden(model, ids, pos, seq, adapters_off: bool = False) -> torch.Tensor:
    """[T, H] last hidden states of one packed row (ids, pos: [1, T]; seq: the varlen
    attention bounds). Unsharded: the decoder alone, no LM head. adapters_off: a LoRA
    model's base alone (peft's disable_adapter, for the decoder's forward only).

    Under FSDP2 the root unit's parameters (embeddings, final norm, LM head) are gathered by
    hooks on the model's own forward, so the model is called as itself (logits_to_keep=1:
    its head runs on one position) and the decoder's output is taken by a forward hook on
    the way. The root is set to keep its parameters gathered after its forward (FSDP's
    default for a root, which distributed.generation leaves switched off): the LM head
    weight the caller reads next is the full one, and the root's parameters stay gathered
    into its backward, whose post-backward reduce-scatters their gradients and reshards
    them. The adapters go off in a pre-hook of the decoder, after the root's pre-forward:
    disable_adapter also clears their requires_grad, and FSDP's lazy initialisation (in
    the first pre-forward) plans gradient dtypes from it. No method is bound to the model
    and no private FSDP API is used."""
    kwargs = dict(input_ids=ids, position_ids=pos, use_cache=False, **seq)
    if "seq_lens" in seq:  # the bounds are known: transformers need not look for them
        kwargs["attention_mask"] = packed_mask(model, ids.device)
    decoder = model.get_decoder()
    with contextlib.ExitStack() as adapters:
        def turn_adapters_off(*_):
            if adapters_off:
                adapters.enter_context(model.disable_adapter())

        if not distributed.is_sharded(model):
            turn_adapters_off()
            return decoder(**kwargs).last_hidden_state[0]
        if "logits_to_keep" not in inspect.signature(lora_base(model).forward).parameters:
            raise NotImplementedError(
                f"{type(lora_base(model)).__name__}.forward takes no logits_to_keep: under "
                f"FSDP2 the fused loss calls the model itself and would get the full [T, V] "
                f"logits")
        model.set_reshard_after_forward(False, recurse=False)
        captured = []
        hooks = [decoder.register_forward_pre_hook(turn_adapters_off),
                 decoder.register_forward_hook(
                     lambda module, args, output: captured.append(output.last_hidden_state))]
        try:
            model(logits_to_keep=1, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
    return captured[0][0]


def policy_loss(model, ids, pos, seq, targets, ref_logp, turn, episode, adv, rows=None,
                **loss_kw):
    """The policy's loss on one packed micro-batch (and its metrics): last hidden states ->
    linear_score_loss on the LM head weight, never the [T, V] logits. loss_kw: stage,
    beta1, beta2, kl, reduction, temperature (linear_score_loss's); rows: the trained rows'
    indices where the caller has them (linear_score_loss's)."""
    hidden = _last_hidden(model, ids, pos, seq)
    weight = model.get_output_embeddings().weight
    return sf.linear_score_loss(hidden, weight.to(hidden.dtype), targets, ref_logp, turn,
                                episode, adv, rows=rows, **loss_kw)


def reference_logprobs(model, ids, pos, seq, targets, rows, temperature=1.0) -> torch.Tensor:
    """The reference's fp32 log-probs of the targets at `rows` (int64 indices of the rows a
    KL applies to: an index, not a mask, so no nonzero runs on the device), 0 elsewhere, at
    `temperature`. A LoRA policy is its own reference: the base, with the adapters
    disabled."""
    hidden = _last_hidden(model, ids, pos, seq, adapters_off=is_lora(model))
    weight = model.get_output_embeddings().weight
    out = torch.zeros(targets.shape, dtype=torch.float32, device=hidden.device)
    out[rows] = sf.linear_logprobs(hidden[rows], weight.to(hidden.dtype), targets[rows],
                                   temperature=temperature).float()
    return out

"""What one training step optimises (trainer.py's step, see its module doc): the stage
schedule, the Objective the config selects (the paper's Stage I / Stage II or a Table 4
ablation), the per-token tensors of a packed micro-batch, and the fused-loss entry points
a prepared model computes them through."""
from __future__ import annotations

import contextlib
import dataclasses

import torch

import score_fast as sf
from score_fast.config import Config
from score_fast.models import is_lora

__all__ = ["Objective", "plan_objective", "stage_at", "build_step_tensors"]


def stage_at(config: Config, step: int) -> int:
    """Stage (1 or 2) of 0-based step `step`: n1 Stage I steps, n2 Stage II, `rounds` times."""
    n1 = config.stage1.steps
    return 1 if step % (n1 + config.stage2.steps) < n1 else 2


@dataclasses.dataclass
class Objective:
    """What one step trains: advantages [E, 2] (attempt 1, attempt 2), which (episode,
    attempt) pairs are trained at all ([E, 2] bool; the others' tokens get turn 0), and
    the loss's stage and KL weights (stage 1: beta2 KL and no policy gradient on attempt
    1; stage 2: policy gradient + beta1 KL on both attempts)."""
    adv: torch.Tensor
    train: torch.Tensor
    stage: int
    beta1: float
    beta2: float


def plan_objective(config: Config, stage: int, r1: torch.Tensor, r2: torch.Tensor | None,
                   group: torch.Tensor) -> Objective:
    """The step's objective, the paper's (Stage I / Stage II) or one of the Table 4
    ablations the config selects (train.single_turn, stage2.method = star). r2 is not read
    for single_turn (its steps sample no attempt 2: pass None)."""
    train = config.train
    n_episodes = len(r1)
    both = torch.ones(n_episodes, 2, dtype=torch.bool)
    if train.single_turn:  # REINFORCE on attempt 1 with its own reward, every step
        adv = sf.score_advantages(r1, r1, group, stage=2, alpha=0.0, baseline=train.baseline,
                                  normalize=train.normalize)
        first_only = torch.tensor([[True, False]]).expand(n_episodes, 2)
        return Objective(adv, first_only, 2, config.stage2.beta1, 0.0)
    if stage == 2 and config.stage2.method == "star":  # SFT on own wrong -> right corrections
        fixed = (r1 <= 0) & (r2 > 0)
        adv = torch.zeros(n_episodes, 2)
        adv[:, 1] = 1.0  # REINFORCE with advantage 1 and no KL = the NLL gradient
        trained = torch.stack([torch.zeros_like(fixed), fixed], 1)
        return Objective(adv, trained, 2, 0.0, 0.0)
    adv = sf.score_advantages(r1, r2, group, stage=stage, alpha=config.stage2.alpha,
                              baseline=train.baseline, normalize=train.normalize)
    beta1 = config.stage1.beta1 if stage == 1 else config.stage2.beta1
    return Objective(adv, both, stage, beta1, config.stage1.beta2)


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


def _policy_loss(self, ids, pos, seq, targets, ref_logp, turn, episode, adv, **loss_kw):
    """Bound to the policy as `score_fast_loss` (and registered with FSDP as a forward, so
    the sharded LM head is gathered for it): last hidden states -> linear_score_loss on the
    LM head weight, never the [T, V] logits."""
    h = self.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False,
                           **seq).last_hidden_state[0]
    w = self.get_output_embeddings().weight
    return sf.linear_score_loss(h, w.to(h.dtype), targets, ref_logp, turn, episode, adv,
                                **loss_kw)


def _ref_logprobs(self, ids, pos, seq, targets, live, temperature=1.0):
    """Bound to the reference as `score_fast_logprobs`: fp32 log-probs of the targets at
    the `live` rows (the only ones a KL applies to), 0 elsewhere, at `temperature`. A LoRA
    policy is its own reference: the base, with the adapters disabled."""
    with self.disable_adapter() if is_lora(self) else contextlib.nullcontext():
        h = self.get_decoder()(input_ids=ids, position_ids=pos, use_cache=False,
                               **seq).last_hidden_state[0]
    w = self.get_output_embeddings().weight
    out = torch.zeros(targets.shape, dtype=torch.float32, device=h.device)
    out[live] = sf.linear_logprobs(h[live], w.to(h.dtype), targets[live],
                                   temperature=temperature).float()
    return out

"""The SCoRe trainer: rollouts -> rewards -> advantages -> packed fused-loss step, Stage I
then Stage II (optionally `rounds` times), resumable from atomic checkpoints.

One step (prompts_per_step prompts x samples_per_prompt episodes):
  1. rollout.py samples attempt 1 and attempt 2 with the policy (temperature 1.0); each
     episode is one token sequence [prompt | y1 | instruction | y2] with segment labels
     0 / 1 / 2.
  2. Rewards r1 = r(y1), r2 = r(y2) from score_fast.rewards; advantages [E, 2] from
     score_advantages(r1, r2, prompt group, stage, alpha, baseline="rloo").
  3. Episodes are packed (score_fast.pack, segments = labels) into micro-batches of
     train.max_tokens tokens; per micro-batch of T tokens:
       targets[t] = input_ids[t + 1]        (next token, within the sequence)
       turn[t]    = label of the TARGET token, 0 at each sequence's last position
       episode[t] = the sequence's row in the advantages (PackedBatch.seq_index)
     hidden = policy.model(input_ids, position_ids, use_cache=False).last_hidden_state
     ref_logp: the frozen reference (the initial policy) under no_grad, through
       linear_logprobs on its hidden states and LM head, only at rows with turn > 0
     loss = linear_score_loss(hidden, policy.lm_head.weight, targets, ref_logp, turn,
       episode, adv, stage, beta1, beta2): Stage I puts beta2 KL (no policy gradient) on
       attempt 1 and REINFORCE + beta1 KL on attempt 2; Stage II puts REINFORCE + beta1 KL
       on both, attempt 2 with the shaped reward r2 + alpha (r2 - r1).
     Micro-batch losses are weighted by their share of the step's loss tokens (or
     episodes, for the seq_mean reductions), so accumulation gives the same loss as one
     batch; then clip, AdamW step.
  A non-finite loss or gradient norm raises NonFiniteLossError before the optimizer step,
  hence before any checkpoint is written.

train.single_turn (Table 4's "without multi-turn training"): step 1 samples attempt 1 only
(episodes [prompt | y1], labels 0 / 1), step 2 scores r1 only, advantages
score_advantages(r1, r1, ..., stage 2, alpha 0) of which attempt 1's are used, step 3 packs
and forwards prompt + y1 (policy and reference) with REINFORCE + stage2.beta1 KL on y1. The
step's metrics have no attempt-2 keys (reward_t2, sample_acc_t2, sample_delta*, kl_t2,
entropy_t2, len_t2, zeros_t2, time/attempt2_s): nothing of attempt 2 was sampled. Its
evaluations (train.eval_file, score-fast eval) still run both attempts.
"""
from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import shutil
import sys
import time

import numpy as np
import torch
import yaml

import score_fast as sf
from score_fast import distributed
from score_fast.checkpoint import (STATE_FILE, load_state, recover_interrupted,
                                   rotate_checkpoints, save_checkpoint, set_rng_state,
                                   usable_checkpoint)
from score_fast.config import BEST_METRICS, Config, config_from_dict
from score_fast.flops import matmul_params, peak_flops, step_flops
from score_fast.kernels._dispatch import unchecked as sf_unchecked
from score_fast.models import (GC_AUTO_PARAMS, apply_lora, disable_dropout, load_lora,
                               load_model, load_tokenizer, policy_weights, prepare_model,
                               resolve_dtype, uses_fsdp, weights_path)
from score_fast.objective import (Objective, build_step_tensors, plan_objective,
                                  policy_loss, reference_logprobs, stage_at)
from score_fast.prompts import PromptBuilder
from score_fast.rewards import make_reward_from
from score_fast.rollout import Episode, Formatter, rollout
from score_fast.scoring import score_episodes

__all__ = ["Trainer", "NonFiniteLossError", "TrainingInterrupted", "PhaseTimer",
           "format_line", "format_eval", "size_warning"]

log = logging.getLogger("score_fast")

BEST_FILE = "best.json"  # run_dir/best.json: the best evaluation and its checkpoint
# a step's attempt-2 metrics: a train.single_turn step samples no attempt 2 and logs none of
# them (nor sample_acc_t2, sample_delta*, sample_edit_ratio, time/attempt2_s)
ATTEMPT2_KEYS = ("reward_t2", "kl_t2", "entropy_t2", "len_t2", "zeros_t2")


# a step on a CPU generating more tokens than this (episodes x attempts x max new tokens) is
# called large when the run starts (size_warning): the demo's is 1,024, the MATH recipe's 1M
CPU_STEP_TOKENS = 8192
# a step whose every reward is 0 is warned about the first time, then every this many such
# steps (with their count), and counted at the run's end
ZERO_REWARD_WARN_EVERY = 50


def _slowest(seconds: list) -> float | None:
    """The largest; None where a rank has none (its backend ran both attempts at once)."""
    return None if None in seconds else max(seconds)


class NonFiniteLossError(RuntimeError):
    pass


class TrainingInterrupted(KeyboardInterrupt, SystemExit):
    """Ctrl-C (SIGINT) during Trainer.train, after the progress bar and the reporter were
    closed (every logged line flushed; checkpoints are only ever complete or absent). A
    KeyboardInterrupt to Python code (`except KeyboardInterrupt` still catches it) and a
    SystemExit with code 130 (128 + SIGINT) to the interpreter: uncaught, as under
    `score-fast train`, the process exits 130 without a traceback, its one-line message
    (str(e): the step reached and how to resume) already logged."""

    def __init__(self, message: str):
        super().__init__(message)
        self.code = 130


@dataclasses.dataclass
class StepShare:
    """One rank's share of a step, ready to train: its episodes, their rewards (scores2 is
    None when attempt 2 was not sampled), the objective of its prompt groups, its rollout
    timing, how many samples the reward failed on, and why rewards were 0 per attempt.
    With several ranks every rank gathers all shares and merges them into the whole step."""
    episodes: list[Episode]
    scores1: list[float]
    scores2: list[float] | None
    objective: Objective
    timing: dict
    reward_errors: int
    zeros1: collections.Counter
    zeros2: collections.Counter

    @classmethod
    def merge(cls, shares: list[StepShare]) -> StepShare:
        """The whole step from every rank's share, in rank order: episodes, scores and the
        objective's rows concatenated; generated tokens, reward errors and zero reasons
        summed; each timing the slowest rank's."""
        two = shares[0].scores2 is not None
        slowest = ("gen_seconds", "attempt1_seconds", "attempt2_seconds")
        return cls(
            episodes=[e for share in shares for e in share.episodes],
            scores1=[x for share in shares for x in share.scores1],
            scores2=[x for share in shares for x in share.scores2] if two else None,
            objective=dataclasses.replace(
                shares[0].objective, adv=torch.cat([share.objective.adv for share in shares]),
                train=torch.cat([share.objective.train for share in shares])),
            timing={"gen_tokens": sum(share.timing["gen_tokens"] for share in shares),
                    **{k: _slowest([share.timing[k] for share in shares]) for k in slowest}},
            reward_errors=sum(share.reward_errors for share in shares),
            zeros1=sum((share.zeros1 for share in shares), collections.Counter()),
            zeros2=sum((share.zeros2 for share in shares), collections.Counter()))


class PhaseTimer:
    """Seconds per phase of a step (`with timer("rewards"): ...`), summed over repeats. On a
    GPU a phase ends with a device sync, so its kernels are counted in it and not in the
    next phase (a sync per phase, a few per step); a phase timed with device=True (the
    per-micro-batch reference and policy phases) records CUDA events instead, read once in
    metrics(): its device time, and no sync inside the micro-batch loop."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = collections.defaultdict(float)
        self.events: list = []  # (name, start, end) of device-timed phases

    @contextlib.contextmanager
    def __call__(self, name: str, device: bool = False):
        if device and self.cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.events.append((name, start, end))
            return
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[name] += time.perf_counter() - t0

    def metrics(self) -> dict[str, float]:
        if self.events:
            self.events[-1][2].synchronize()
            for name, start, end in self.events:
                self.seconds[name] += start.elapsed_time(end) / 1000
            self.events.clear()
        return {f"time/{k}_s": v for k, v in self.seconds.items()}


def memory_metrics(device: torch.device) -> dict[str, float]:
    """The step's peak device memory (torch's allocator, reset at each step's start) and the
    process's peak resident host memory so far, in GiB."""
    import resource
    out = {"mem/host_peak_rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    if device.type == "cuda":
        out["mem/device_peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        out["mem/device_reserved_gib"] = torch.cuda.max_memory_reserved(device) / 2**30
    return out


def lr_scheduler(optimizer, train, total_steps: int):
    """train.lr_schedule over the run's steps, after train.warmup_steps of linear warmup
    (transformers' schedulers; constant with no warmup is the paper's Adam)."""
    from transformers import get_scheduler
    name = train.lr_schedule
    if name == "constant" and train.warmup_steps:
        name = "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=train.warmup_steps,
                         num_training_steps=max(total_steps, 1))


def size_warning(config: Config, device: torch.device, world: int = 1) -> str | None:
    """A warning when the run is large for the device it runs on, else None: on a CPU, a
    step that generates more than CPU_STEP_TOKENS tokens a rank (episodes x attempts x
    rollout.max_new_tokens, each then trained on), with the numbers and the fields that
    shrink it."""
    if device.type != "cpu":
        return None
    prompts, samples = config.train.prompts_per_step, config.rollout.samples_per_prompt
    attempts = 1 if config.train.single_turn else 2
    new = config.rollout.max_new_tokens
    per_step = prompts * samples * attempts * new
    if per_step <= CPU_STEP_TOKENS * world:
        return None
    steps = config.train.rounds * (config.stage1.steps + config.stage2.steps)
    ranks = f" over {world} ranks" if world > 1 else ""
    fields = ("train.prompts_per_step, rollout.samples_per_prompt, rollout.max_new_tokens, "
              "stage1.steps / stage2.steps" + (" / train.rounds" if config.train.rounds > 1
                                               else ""))
    return (f"this run is large for a CPU: {steps:,} steps x {prompts * samples:,} episodes "
            f"({prompts} prompts x {samples} samples) x {attempts} attempt"
            f"{'s' if attempts > 1 else ''} x up to {new:,} new tokens = up to "
            f"{per_step:,} generated tokens a step{ranks} ({steps * per_step:.2g} in all), "
            f"each also trained on; a CPU step of more than {CPU_STEP_TOKENS:,} a rank takes "
            f"minutes or more with a real model. Shrink it ({fields}) or run it on a GPU")


def _check_ids(ids: np.ndarray, vocab: int, tokens: int) -> None:
    """The micro-batch's token ids against the model's vocabulary, on the host (the kernels'
    own check would read the device)."""
    if ids.size and not (0 <= ids.min() and ids.max() < vocab):
        raise ValueError(f"a micro-batch of {tokens} tokens holds token ids in "
                         f"[{ids.min()}, {ids.max()}], outside the model's vocabulary "
                         f"[0, {vocab}): the tokenizer and model.path do not match")


class Trainer:
    """Holds the policy, the frozen reference, the optimizer and the data of one run."""

    def __init__(self, config: Config, *, model=None, tokenizer=None, rows=None, reward=None,
                 callbacks=()):
        """config: the run. The Python API may pass objects instead of what the config names:
        model + tokenizer (a transformers causal LM and its tokenizer) instead of model.path;
        rows (dicts) instead of data.train_file; reward (a score_fast Reward, or a function
        in either custom-reward convention) instead of the reward section. callbacks:
        f(trainer, metrics) after every step, on every rank; one that sets
        trainer.should_stop = True ends train() after that step.

        In order, each failing before anything costly: the config checked, the dtype and the
        process group, the rows and every prompt rendered, the reward, the checkpoint to
        resume, the run directory and config.yaml, the models and optimizer, the resumed
        state, the vLLM engine."""
        # every check once more: fields set after construction skipped __post_init__
        config_from_dict(dataclasses.asdict(config))
        for name, value, given in (("model.path", config.model.path, model),
                                   ("data.train_file", config.data.train_file, rows)):
            if not value and given is None:
                raise ValueError(f"{name} is required (score-fast train --help)")
        if (model is None) != (tokenizer is None):
            raise ValueError("model and tokenizer go together: pass both or neither")
        if model is not None and config.rollout.backend == "vllm" and not config.model.path:
            raise ValueError("rollout.backend=vllm loads the weights from files: set "
                             "model.path (the engine then gets the policy's weights)")
        self.config = config
        self.callbacks, self.should_stop = list(callbacks), False
        self._given_model = model
        self.hub = {"revision": config.model.revision,
                    "trust_remote_code": config.model.trust_remote_code}
        self.dtype = self._dtype(model)
        self.lora = config.model.lora.rank > 0
        self.dist = dist = distributed.setup(fsdp=uses_fsdp(
            int(os.environ.get("WORLD_SIZE", "1")), self.dtype, self.lora,
            config.model.offload_optimizer))
        self.device = dist.device
        if config.train.prompts_per_step % dist.world:
            raise ValueError(f"train.prompts_per_step={config.train.prompts_per_step} does not "
                             f"divide over {dist.world} ranks: each rank samples whole prompt "
                             f"groups, so it must be a multiple of the world size")
        torch.manual_seed(config.train.seed + dist.rank)  # ranks sample different rollouts
        self._load_rows(rows)
        self.tokenizer = tokenizer or load_tokenizer(config.model.path, **self.hub)
        if self.tokenizer.pad_token_id is None:  # as load_tokenizer does
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.formatter = Formatter(self.tokenizer, self.prompts.instruction)
        self._check_prompt_lengths()
        self.eval_task = self._load_eval_task() if config.train.eval_file else None
        self._set_rewards(reward)
        self.run_dir = config.train.run_dir
        ckpt = self._checkpoint_to_resume()
        saved = self._saved_config(model, reward)
        self.config_yaml = yaml.safe_dump(saved, sort_keys=False)
        if ckpt:
            self._check_resumed_config(ckpt, saved)
        from score_fast.reporting import Reporter
        self.reporter = Reporter(config.train.report_to, self.run_dir, config=saved,
                                 enabled=dist.main)
        if dist.main:
            os.makedirs(self.run_dir, exist_ok=True)
            with open(os.path.join(self.run_dir, "config.yaml"), "w") as f:
                f.write(self.config_yaml)
        self.load_models(ckpt)
        self.step = 0
        self.total_steps = config.train.rounds * (config.stage1.steps + config.stage2.steps)
        self.scheduler = lr_scheduler(self.optimizer, config.train, self.total_steps)
        self.timer = PhaseTimer(self.device)  # per step, from train_step
        self.best = None  # {"step", "metric", "value", "checkpoint"} of the best evaluation
        # steps this Trainer took, and how many of them had every reward 0 (train_step sets
        # last_step_all_zero); the run summary is logged at the first train() call
        self.steps_taken = self.zero_reward_steps = 0
        self.last_step_all_zero, self.first_zero_step, self._announced = False, None, False
        if ckpt:
            self._restore(ckpt)
        self.engine = None
        self.slots = self._slot_engine()  # rollout.backend=hf on a SlotEngine, or None
        if config.rollout.backend == "vllm":
            from score_fast.vllm_engine import VLLMEngine
            # an engine per tensor_parallel_size ranks (a collective: every rank at once)
            self.engine = VLLMEngine(weights_path(config.model.path, **self.hub),
                                     dtype=self.dtype, seed=config.train.seed,
                                     config=config.rollout.vllm, ranks=dist.world, **self.hub)
            # the files are not the policy after a resume, nor with LoRA's own init
            self.sync_engine()
            log.info("vLLM engine up in %.1fs", self.engine.startup_s)

    def _slot_engine(self):
        """A SlotEngine over the policy where rollout.engine picks it (auto: on a CUDA
        device where the model allows it), else None (score_fast.sampler samples)."""
        from score_fast.slot_engine import SlotEngine, unsupported
        rc = self.config.rollout
        if rc.backend != "hf" or rc.engine == "sampler":
            return None
        why = unsupported(self.policy)
        if rc.engine == "slots" and why:
            raise ValueError(f"rollout.engine=slots: SlotEngine cannot run this model: {why}; "
                             f"rollout.engine=sampler runs it")
        if why or (rc.engine == "auto" and self.device.type != "cuda"):
            return None
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        # episodes_in_flight None: as many as the free memory holds (all, at most 512)
        return SlotEngine(self.policy, tok.eos_token_id, pad, max_slots=rc.episodes_in_flight)

    def _dtype(self, model) -> torch.dtype:
        """The compute dtype: model.dtype, where "auto" is the checkpoint's (or a given
        model's own: bf16/fp16 kept, anything else fp32)."""
        name = self.config.model.dtype
        if model is None:
            return resolve_dtype(name, self.config.model.path, **self.hub)
        if name == "auto":
            own = next(model.parameters()).dtype
            return own if own in (torch.bfloat16, torch.float16) else torch.float32
        return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]

    def _load_rows(self, rows) -> None:
        """self.rows from data.train_file (or the rows given), each checked for the fields
        the run reads, and every row's prompt rendered once, up front: a row the format
        cannot render fails here, naming it, not at the step that first samples it."""
        from score_fast.data import check_row, load_rows
        from score_fast.rewards.math import with_reference
        config = self.config
        self.data_name = config.data.train_file or "the rows passed to Trainer"
        # a math row's reference may be the last \boxed of its `solution` (Hendrycks' MATH)
        answer = config.answer_field() if config.reward.kind == "math" else None
        required = [f for f in config.required_fields() if f != answer]
        if rows is None:
            self.rows = load_rows(config.data.train_file, required, limit=config.data.limit)
        else:
            self.rows = list(rows)[:config.data.limit]
            if not self.rows:
                raise ValueError("Trainer(rows=...) got no rows")
            for i, r in enumerate(self.rows):
                check_row(r, f"row {i + 1}", self.data_name, required)
        if answer:
            self.rows = [with_reference(r, answer, f"row {i + 1} of {self.data_name}")
                         for i, r in enumerate(self.rows)]
        if len(self.rows) < config.train.prompts_per_step and self.dist.enabled:
            raise ValueError(f"{self.data_name} has {len(self.rows)} rows, fewer than "
                             f"train.prompts_per_step={config.train.prompts_per_step}")
        self.prompts = PromptBuilder.from_config(config)
        self.prompt_texts = [self.prompts.render(r, f"row {i + 1} of {self.data_name}")
                             for i, r in enumerate(self.rows)]
        self.row_numbers = list(range(1, len(self.rows) + 1))  # in the file, for messages

    def _set_rewards(self, reward) -> None:
        """self.reward from the config, or the Reward / function given; self.eval_reward the
        same unless the eval file's answer field differs."""
        config = self.config
        if reward is None:
            self.reward = make_reward_from(config)
        elif hasattr(reward, "evaluate") or hasattr(reward, "score"):  # a Reward object
            self.reward = reward
        elif callable(reward):
            self.reward = make_reward_from(config, function=reward)
        else:
            raise TypeError(f"Trainer(reward=...) takes a score_fast Reward or a function, "
                            f"got {type(reward).__name__}")
        self.eval_reward = self.reward
        if self.eval_task and self.eval_task.config.answer_field() != config.answer_field():
            # a MATH file's `answer` while the run reads another field: the same reward,
            # reading the field the eval rows carry
            self.eval_reward = make_reward_from(self.eval_task.config)
        if config.reward.kind == "math" and config.reward.lenient_math and self.dist.main:
            log.warning("math reward: lenient (reward.lenient_math): a response that states no "
                        "final answer is scored on its last number; the paper's checker "
                        "scores it 0")

    def _checkpoint_to_resume(self) -> str | None:
        """The newest checkpoint in run_dir whose files verify (a damaged one is named and
        skipped; rank 0 reads and hashes them, the others take its answer or its error), or
        None; after repairing what an interrupted save left behind. A fresh run's directory
        is prepared here (_fresh_run_dir)."""
        config, dist = self.config, self.dist
        if dist.main:  # what an interrupted save left behind
            for done in recover_interrupted(self.run_dir):
                log.warning("%s: %s (an interrupted save)", self.run_dir, done)
        distributed.barrier(dist)
        ckpt = None
        if config.train.resume is not False:
            found = None
            if dist.main:
                try:
                    found = usable_checkpoint(self.run_dir)
                except Exception as e:  # noqa: BLE001 - re-raised on every rank below
                    found = e
            found = distributed.gather_objects(found, dist)[0]
            if isinstance(found, Exception):
                raise found
            ckpt = found
        if config.train.resume is True and ckpt is None:
            raise FileNotFoundError(
                f"train.resume=true but {self.run_dir} holds no complete checkpoint "
                f"(checkpoint-N/ with {STATE_FILE}); train.resume=null resumes only when "
                f"there is one")
        if ckpt is None:
            self._fresh_run_dir(dist)
        return ckpt

    def _saved_config(self, model, reward) -> dict:
        """The config as config.yaml records it: callables by their importable names, a
        given model by its name."""
        from score_fast.rewards.custom import function_name
        saved = dataclasses.asdict(self.config)
        if callable(self.config.reward.function):  # an API callable: recorded by its name
            saved["reward"]["function"] = function_name(self.config.reward.function)
        if callable(reward) and not hasattr(reward, "evaluate"):
            # a function passed to Trainer: a custom reward by its name (a module-level one
            # loads again by that name, e.g. in score-fast eval); a Reward object is not
            # recorded (the config's own reward section stays)
            saved["reward"].update(kind="custom", function=function_name(reward))
        if model is not None:
            saved["model"]["path"] = saved["model"]["path"] or "passed to Trainer: " + str(
                getattr(model.config, "_name_or_path", "") or type(model).__name__)
        return saved

    def _restore(self, ckpt: str) -> None:
        """Step, RNG, optimizer, scaler and scheduler state from ckpt; the logs cut back to
        its step; the best evaluation so far."""
        state = load_state(ckpt, self.policy, self.optimizer, self.dist)
        self.step = state["step"]
        set_rng_state(state["rng"])
        if self.scaler is not None and "scaler" in state:
            self.scaler.load_state_dict(state["scaler"])
        if "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])
        log.info("resumed from %s at step %d", ckpt, self.step)
        if self.dist.main:
            self._cut_logs()
        best = os.path.join(self.run_dir, BEST_FILE)
        if os.path.isfile(best):
            with open(best) as f:
                self.best = json.load(f)

    def _check_resumed_config(self, ckpt: str, saved: dict) -> None:
        """A resume continues the checkpoint's run: a field that changes what it trains
        (config.config_changes) is refused unless train.allow_config_change."""
        from score_fast.config import config_changes
        path = os.path.join(ckpt, "config.yaml")
        if not os.path.isfile(path):
            return
        with open(path) as f:
            changes = config_changes(yaml.safe_load(f) or {}, saved)
        if not changes:
            return
        if not self.config.train.allow_config_change:
            raise ValueError(f"resuming {ckpt} with a config that changes the run: "
                             f"{'; '.join(changes)}. Resume with the checkpoint's values, or "
                             f"set train.allow_config_change=true to continue with these")
        for change in changes:
            log.warning("resumed with a changed config (train.allow_config_change): %s",
                        change)

    def _cut_logs(self) -> None:
        """A resume at step N drops what was logged after N (steps the killed run took past
        its last checkpoint, which this run takes again) from metrics.jsonl and samples.jsonl;
        TensorBoard and wandb keep theirs (they file a repeated step under the new values)."""
        for name in ("metrics.jsonl", "samples.jsonl"):
            path = os.path.join(self.run_dir, name)
            if not os.path.isfile(path):
                continue
            with open(path) as f:
                lines = f.readlines()
            keep = []
            for line in lines:
                try:
                    if json.loads(line)["step"] <= self.step:
                        keep.append(line if line.endswith("\n") else line + "\n")
                except (ValueError, KeyError, TypeError):  # a line cut short by the kill
                    pass
            if len(keep) != len(lines):
                with open(path + ".tmp", "w") as f:
                    f.writelines(keep)
                os.replace(path + ".tmp", path)
                log.warning("%s: dropped %d lines logged after step %d (resumed there)", path,
                            len(lines) - len(keep), self.step)

    def sync_engine(self) -> float:
        """Push the policy's weights into the vLLM engine (after every optimizer step)."""
        return self.engine.sync(policy_weights(self.policy, self.dtype))

    def _fresh_run_dir(self, dist) -> None:
        """A run starting at step 0 must not append to another run's metrics.jsonl or replace
        its checkpoints one by one: refused, or (train.overwrite) those removed first."""
        held = []
        if os.path.isdir(self.run_dir):
            held = [n for n in sorted(os.listdir(self.run_dir))
                    if n in ("metrics.jsonl", BEST_FILE)
                    or n.startswith(("checkpoint-", ".tmp-checkpoint-"))]
        if not held:
            return
        if not self.config.train.overwrite:
            raise FileExistsError(
                f"{self.run_dir} already holds a run ({', '.join(held[:4])}"
                f"{', ...' if len(held) > 4 else ''}): train.resume=true (or null) continues "
                f"it, train.overwrite=true starts over and removes those, or pick another "
                f"train.run_dir")
        if dist.main:
            for n in held:
                path = os.path.join(self.run_dir, n)
                shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
            log.warning("train.overwrite: removed %dist entries of the run in %s", len(held),
                        self.run_dir)
        distributed.barrier(dist)

    def _over_budget(self, texts: list[str]) -> tuple[list[int], str, list[int]]:
        """Indices of the prompts over data.max_prompt_tokens, the first few named, and
        every prompt's length."""
        budget = self.config.data.max_prompt_tokens
        lengths = [len(self.formatter.prompt_ids(t)) for t in texts]
        over = [i for i, n in enumerate(lengths) if n > budget]
        first = ", ".join(f"row {i + 1} ({lengths[i]} tokens)" for i in over[:5])
        more = f" and {len(over) - 5} more" if len(over) > 5 else ""
        return over, (f"{len(over)} of {len(texts)} prompts are longer than "
                      f"data.max_prompt_tokens={budget}: {first}{more}"), lengths

    def _check_prompt_lengths(self) -> None:
        """Every row's prompt against data.max_prompt_tokens, before any model loads:
        data.overlong=error stops here naming the first rows, skip drops them (logged).
        Then the longest episode the run can sample against train.max_tokens."""
        config = self.config
        over, what, lengths = self._over_budget(self.prompt_texts)
        within = [n for n in lengths if n <= config.data.max_prompt_tokens]  # the rows kept
        self._check_episode_budget(max(within, default=0))
        if not over:
            return
        what = f"{self.data_name}: {what}"
        if config.data.overlong == "error":
            raise ValueError(f"{what}; raise the budget or set data.overlong=skip")
        keep = sorted(set(range(len(self.rows))) - set(over))
        if len(keep) < config.train.prompts_per_step and self.dist.enabled or not keep:
            raise ValueError(f"{what}; skipping them leaves {len(keep)} rows, too few for "
                             f"train.prompts_per_step={config.train.prompts_per_step}")
        log.warning("%s; skipped (data.overlong=skip)", what)
        self.rows = [self.rows[i] for i in keep]
        self.prompt_texts = [self.prompt_texts[i] for i in keep]
        self.row_numbers = [self.row_numbers[i] for i in keep]

    def _check_episode_budget(self, longest_prompt: int) -> None:
        """A micro-batch of train.max_tokens must hold the longest episode: the longest
        prompt + attempt 1 + the instruction + attempt 2, each attempt at its budget
        (train.single_turn: the longest prompt + attempt 1)."""
        config, formatter = self.config, self.formatter
        self.longest_prompt, self.instruction_tokens = longest_prompt, 0
        if not self.prompt_texts:
            return
        if config.train.single_turn:
            longest = longest_prompt + config.rollout.max_new_tokens
            if config.train.max_tokens < longest:
                raise ValueError(
                    f"train.max_tokens={config.train.max_tokens} is below the longest episode this "
                    f"run can sample: the longest prompt ({longest_prompt} tokens) + "
                    f"rollout.max_new_tokens ({config.rollout.max_new_tokens}) = {longest} "
                    f"(train.single_turn: attempt 1 only); raise train.max_tokens to at "
                    f"least that")
            return
        instruction = max(len(formatter.instruction_ids(self.prompt_texts[0], ids))
                          for ids in ([], [formatter.eos] if formatter.eos is not None else []))
        self.instruction_tokens = instruction
        longest = longest_prompt + 2 * config.rollout.max_new_tokens + instruction
        if config.train.max_tokens < longest:
            raise ValueError(
                f"train.max_tokens={config.train.max_tokens} is below the longest episode this run "
                f"can sample: the longest prompt ({longest_prompt} tokens) + 2 x "
                f"rollout.max_new_tokens ({config.rollout.max_new_tokens}) + the instruction "
                f"({instruction}) = {longest}; raise train.max_tokens to at least that")

    def _load_eval_task(self):
        """train.eval_file read, checked against the run's reward and rendered with the
        run's prompt format, before any model loads (score_fast.evaluation's loader)."""
        from score_fast.data import DataError, load_rows
        from score_fast.evaluation import detect_config, make_task
        config, path = self.config, self.config.train.eval_file
        rows = load_rows(path, [], limit=config.train.eval_limit)
        kind = config.reward.kind
        eval_config = detect_config(rows, path, config, kind=None if kind == "custom" else kind)
        if eval_config.reward.kind != kind:
            raise DataError(f"train.eval_file {path}: its rows lack the fields of the run's "
                            f"{kind} reward ({', '.join(config.required_fields())})")
        task = make_task(rows, eval_config, path)
        over, what, _ = self._over_budget(task.problems)
        if over:  # an evaluation scores every row, so none is skipped
            raise ValueError(f"train.eval_file {path}: {what}; raise the budget or drop them")
        if len(task.rows) < self.dist.world:
            raise ValueError(f"train.eval_file {path} has {len(task.rows)} rows, fewer than "
                             f"the {self.dist.world} ranks that evaluate a share each")
        return task

    def load_models(self, ckpt: str | None) -> None:
        """The policy, the frozen reference and the optimizer, per the precision plan
        (score_fast.models): full fine-tune: an fp32 policy (FSDP2-gathered in model.dtype
        below fp32) and a reference in model.dtype; LoRA: the base in model.dtype with fp32
        adapters, which is its own reference with the adapters off."""
        config, dist, model_cfg = self.config, self.dist, self.config.model
        load = dict(self.hub, attn_implementation=model_cfg.attn_implementation)
        given = self._given_model
        if self.lora:
            base = (given.to(self.dtype) if given is not None else
                    load_model(model_cfg.path, dtype=self.dtype, **load))
            disable_dropout(base)  # before the adapters: theirs is model.lora.dropout
            self.policy = (load_lora(base, ckpt) if ckpt else
                           apply_lora(base, model_cfg.lora, seed=config.train.seed))
            self.ref = self.policy
        elif given is not None:  # the reference is a copy, made before the policy upcasts
            self.ref = copy.deepcopy(given).to(self.dtype).requires_grad_(False)
            self.policy = (load_model(ckpt, "checkpoint", torch.float32, **load) if ckpt else
                           given.float())
        else:
            self.ref = load_model(model_cfg.path, dtype=self.dtype, **load)
            self.ref.requires_grad_(False)
            self.policy = (load_model(ckpt, "checkpoint", torch.float32, **load) if ckpt else
                           load_model(model_cfg.path, dtype=torch.float32, **load))
        if not self.lora:
            self.policy.config.dtype = self.dtype  # checkpoints are written in it
        self.ref.eval()
        gc, why = self._checkpointing()
        self.gradient_checkpointing = gc
        self.checkpointing_note = f"gradient checkpointing {'on' if gc else 'off'}: {why}"
        if gc:  # transformers >= 5.2x renamed it; 5.17 (the GPU image) has the old name
            kw = {"use_reentrant": False}
            if hasattr(self.policy, "activation_checkpointing_enable"):
                self.policy.activation_checkpointing_enable(activation_checkpointing_kwargs=kw)
            else:
                self.policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kw)
        self.flops_shape, self.peak_flops = matmul_params(self.policy), peak_flops(dist.device)
        if self.ref is not self.policy:  # frozen, in its compute dtype: sharded only to split
            prepare_model(self.ref, dist, shard=dist.enabled)
        low = self.dtype if self.dtype != torch.float32 else None
        prepare_model(self.policy, dist, shard=dist.fsdp, param_dtype=low,
                      offload=model_cfg.offload_optimizer)
        # fused: one kernel over all parameters; foreach would allocate full-size temporaries
        # of the update (+4 bytes a parameter at the step: 28 GiB at 7B)
        self.optimizer = torch.optim.AdamW(self.trainable, lr=config.train.lr,
                                           weight_decay=config.train.weight_decay, fused=True)
        # fp16: dynamic loss scaling, or small gradients underflow to 0 (bf16 has fp32's range)
        self.scaler = (torch.amp.GradScaler(dist.device.type)
                       if self.dtype == torch.float16 else None)

    def _checkpointing(self) -> tuple[bool, str]:
        """model.gradient_checkpointing, or (None) the memory model's choice: on only where
        the training phase would not fit the device without it (score_fast.memory; a
        CPU's device is its physical memory)."""
        from score_fast import memory
        from score_fast.models import lora_base
        config = self.config
        if config.model.gradient_checkpointing is not None:
            return config.model.gradient_checkpointing, "model.gradient_checkpointing"
        rc, world = config.rollout, self.dist.world
        shape = memory.StepShape(
            max_tokens=config.train.max_tokens,
            episodes=config.train.prompts_per_step * rc.samples_per_prompt // world,
            gen_batch_size=rc.gen_batch_size, in_flight=rc.episodes_in_flight or rc.gen_batch_size,
            prompt_tokens=self.longest_prompt, max_new_tokens=rc.max_new_tokens,
            instruction_tokens=self.instruction_tokens, world=world)
        dtype = {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(self.dtype, "fp32")
        cfg = lora_base(self.policy).config.get_text_config()
        try:
            if self.device.type == "cuda":
                total = torch.cuda.get_device_properties(self.device).total_memory
            else:
                total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
            return memory.checkpointing(cfg, total, dtype=dtype, lora_rank=config.model.lora.rank,
                                        offload=config.model.offload_optimizer, shape=shape)
        except (AttributeError, ValueError, OSError) as e:
            # a config without the Llama-style fields the memory model reads, or a host that
            # does not report its memory
            n = sum(p.numel() for p in self.policy.parameters())
            return n >= GC_AUTO_PARAMS, (f"the memory model has no answer here ({e}); by "
                                         f"parameter count ({n / 1e9:.2f}B, on from "
                                         f"{GC_AUTO_PARAMS / 1e9:g}B)")

    @property
    def trainable(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.parameters() if p.requires_grad]

    # ------------------------------------------------------------------ one step
    def rollouts(self, step: int) -> tuple[list[Episode], list[dict], dict]:
        """This rank's episodes: its share of the step's prompts (all samples of a prompt
        stay on one rank, so the RLOO groups are whole). train.single_turn: attempt 1 only."""
        config, dist = self.config, self.dist
        pick = np.random.default_rng([config.train.seed, step])  # stateless: same on resume
        n = min(config.train.prompts_per_step, len(self.rows))
        idx = pick.choice(len(self.rows), size=n, replace=False).tolist()[dist.rank::dist.world]
        rows = [self.rows[i] for i in idx]
        self.policy.eval()
        # the hf sampler runs the policy (kept gathered for it); vLLM has its own copy
        gen = (contextlib.nullcontext() if self.engine else
               distributed.generation(self.policy, dist))
        with gen:
            episodes, timing = rollout(
                self.policy, self.tokenizer, self.formatter,
                [self.prompt_texts[i] for i in idx],
                samples=config.rollout.samples_per_prompt,
                max_new_tokens=config.rollout.max_new_tokens,
                temperature=config.rollout.temperature, batch_size=config.rollout.gen_batch_size,
                max_prompt_tokens=config.data.max_prompt_tokens,
                row_names=[f"row {self.row_numbers[i]} of {self.data_name}" for i in idx],
                in_flight=config.rollout.episodes_in_flight or config.rollout.gen_batch_size,
                engine=self.engine or self.slots,
                attempts=1 if config.train.single_turn else 2)
        return episodes, [rows[e.prompt_index] for e in episodes], timing

    def loss_and_backward(self, episodes: list[Episode], objective: Objective) -> dict:
        """Packed forward/backward over the step's episodes (the same global list on every
        rank; gradients accumulate in .grad). With several ranks each trains on its
        balanced share (by token count) and the loss is normalised over all ranks."""
        config, dist = self.config, self.dist
        mine = (sf.balanced_partition([len(e.ids) for e in episodes], dist.world)[dist.rank]
                if dist.enabled else list(range(len(episodes))))
        seqs = [episodes[i].ids for i in mine]
        # the run's start checked that every episode fits (_check_episode_budget); one that
        # does not (a chat template whose instruction grows with the problem) gets a
        # micro-batch of its own
        budget = max(config.train.max_tokens, max(len(s) for s in seqs))
        batches = sf.pack(seqs, budget, segments=[episodes[i].labels for i in mine])
        if dist.enabled:
            # FSDP's all-gathers and reduce-scatters are collectives: every rank runs the
            # same number of micro-batches, short ranks add empty ones (loss 0)
            n = max(distributed.gather_objects(len(batches), dist))
            pad = self.tokenizer.pad_token_id or 0
            batches += sf.pack([[pad, pad]], budget, segments=[[0, 0]]) * (n - len(batches))
        trained = objective.train[mine]
        parts = [build_step_tensors(batch, trained) for batch in batches]
        per_token = objective.reduction == "token_mean"
        units = [int((part["turn"] > 0).sum()) if per_token else
                 len(torch.unique(part["episode"][part["turn"] > 0])) for part in parts]
        total = max(distributed.all_reduce_sum({"u": sum(units)}, dist)["u"], 1)
        adv = objective.adv[mine].to(self.device)
        loss_kw = objective.loss_kwargs()
        out = {"loss": 0.0, "kl_sum1": 0.0, "kl_sum2": 0.0, "ent_sum1": 0.0, "ent_sum2": 0.0,
               "n1": 0, "n2": 0, "tokens": 0, "nonfinite": 0}
        # on the device, read once after the loop: each micro-batch's [loss, loss share,
        # kl1 x n1, kl2 x n2, entropy1 x n1, entropy2 x n2] (was 5 .item() and a finiteness
        # test a micro-batch: 6 host syncs, with 2 a layer in attention and the kernels'
        # value checks on top)
        sums, tokens = [], []
        vocab = self.policy.get_output_embeddings().weight.shape[0]
        self.policy.train()
        for batch, part, share in zip(batches, parts, units):
            # what the host knows: the bounds, the trained rows, the attempt sizes; the
            # kernels' value checks are done here, on the host, where the data is made
            turn_h = part["turn"].numpy()
            rows_h = np.flatnonzero(turn_h > 0)
            n1, n2 = int((turn_h == 1).sum()), int((turn_h == 2).sum())
            out["tokens"] += batch.num_tokens
            if not len(rows_h) and not dist.enabled:  # nothing trained (e.g. STaR, no fix)
                continue
            _check_ids(batch.input_ids.numpy(), vocab, batch.num_tokens)
            ids, pos, targets, turn, episode, rows = (self._to_device(t) for t in (
                batch.input_ids, batch.position_ids, part["targets"], part["turn"],
                part["episode"], torch.from_numpy(rows_h)))
            # sequence bounds for varlen attention (score_fast.attention), seq_lens as host
            # ints so no layer reads them back; other implementations read position_ids
            cu = self._to_device(batch.cu_seqlens)
            seq = {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu, "max_length_q": batch.max_seqlen,
                   "max_length_k": batch.max_seqlen,
                   "seq_lens": batch.cu_seqlens.diff().tolist()}
            # log-probs at the sampling temperature: the policy that sampled is
            # softmax(logits / T), so the policy gradient and the KL are on-policy for it
            with sf_unchecked():
                with torch.no_grad(), self.timer("reference", device=True):
                    ref_logp = reference_logprobs(self.ref, ids, pos, seq, targets, rows,
                                                  temperature=objective.temperature)
                with self.timer("policy", device=True):  # forward + backward
                    loss, stats = policy_loss(self.policy, ids, pos, seq, targets, ref_logp,
                                              turn, episode, adv, rows=rows, **loss_kw)
                    # FSDP averages gradients over ranks: x world makes it the sum over
                    # micro-batches. A non-finite loss is found after the loop, before the
                    # optimizer step
                    weighted = loss * (share * dist.world / total)
                    (self.scaler.scale(weighted) if self.scaler is not None
                     else weighted).backward()
            loss = loss.detach().float()
            sums.append(torch.stack([loss, loss * (share / total),
                                     stats["kl_t1"].float() * n1, stats["kl_t2"].float() * n2,
                                     stats["entropy_t1"].float() * n1,
                                     stats["entropy_t2"].float() * n2]))
            tokens.append(batch.num_tokens)
            out["n1"] += n1
            out["n2"] += n2
        if sums:  # the step's one read of device values
            table = torch.stack(sums).double().cpu().numpy()
            bad = np.flatnonzero(~np.isfinite(table[:, 0]))
            out["nonfinite"] = len(bad)
            if len(bad) and not dist.enabled:  # several ranks: all stop together, below
                self._nonfinite(f"loss is {table[bad[0], 0]}", objective.stage,
                                tokens[bad[0]])
            for k, col in zip(("loss", "kl_sum1", "kl_sum2", "ent_sum1", "ent_sum2"),
                              table[:, 1:].sum(0).tolist()):
                out[k] += col
        out = distributed.all_reduce_sum(out, dist)
        if out["nonfinite"]:
            self._nonfinite(f"loss is not finite on {int(out['nonfinite'])} micro-batches",
                            objective.stage)
        return out

    def _to_device(self, t: torch.Tensor) -> torch.Tensor:
        """A host tensor on the training device; on a GPU through pinned memory and an
        async copy (a pageable copy makes the host wait for the stream)."""
        if self.device.type != "cuda":
            return t.to(self.device)
        return t.pin_memory().to(self.device, non_blocking=True)

    def _nonfinite(self, what: str, stage: int, tokens: int | None = None):
        where = f", micro-batch of {tokens} tokens" if tokens else ""
        raise NonFiniteLossError(f"{what} at step {self.step + 1} (stage {stage}{where}); "
                                 f"stopping before the optimizer step, no checkpoint written. "
                                 f"Lower train.lr or check the model.")

    def optimize(self, episodes: list[Episode], objective: Objective) -> tuple[dict, float]:
        """One optimizer step on the step's (global) episodes: zero, packed backward, clip,
        AdamW. Returns the loss statistics and the gradient norm before clipping."""
        self.optimizer.zero_grad(set_to_none=True)
        out = self.loss_and_backward(episodes, objective)
        with self.timer("optimizer"):
            return out, self._step_optimizer(objective)

    def _step_optimizer(self, objective: Objective) -> float:
        """Unscale (fp16), clip, AdamW, schedule; returns the norm before clipping."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.config.train.max_grad_norm)
        norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)
        if not math.isfinite(norm) and self.scaler is not None:
            # fp16 overflow: the scaler skips the step and halves its scale (loss scaling's
            # normal course, not a diverged run)
            log.warning("fp16 gradient overflow at step %d: step skipped, loss scale %g -> %g",
                        self.step + 1, self.scaler.get_scale(), self.scaler.get_scale() / 2)
        elif not math.isfinite(norm):
            raise NonFiniteLossError(f"gradient norm is {norm} at step {self.step + 1} "
                                     f"(stage {objective.stage}); no optimizer step, "
                                     f"no checkpoint")
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        # gradients are not kept into the next rollout (4 bytes a parameter, full fine-tune)
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def _sample_and_score(self, stage: int) -> StepShare:
        """This rank's share of the step: its rollouts, their rewards, and the objective of
        its prompt groups (whole on each rank)."""
        config = self.config
        two = not config.train.single_turn  # single_turn: attempt 2 is not sampled nor scored
        episodes, rows, timing = self.rollouts(self.step)
        if timing["attempt1_seconds"] is None:  # SlotEngine: both attempts in the same steps
            self.timer.seconds["attempts"] = timing["gen_seconds"]
        else:
            self.timer.seconds["attempt1"] = timing["attempt1_seconds"]
            if two:
                self.timer.seconds["attempt2"] = timing["attempt2_seconds"]
        zeros1, zeros2 = collections.Counter(), collections.Counter()
        scores2, errors2, messages2 = None, 0, []
        with self.timer("rewards"):
            scores1, errors1, messages1 = score_episodes(
                self.reward, [e.text1 for e in episodes], rows, failures=zeros1)
            if two:
                scores2, errors2, messages2 = score_episodes(
                    self.reward, [e.text2 for e in episodes], rows, failures=zeros2)
        for message in (messages1 + messages2)[:3]:
            log.warning("reward error (scored 0): %s", message)
        if config.train.log_samples_every:
            from score_fast.reporting import sample_rows
            problems = [row.get(config.problem_field()) for row in rows]
            self.last_samples = sample_rows(self.step + 1, problems, episodes, scores1,
                                            scores2, config.train.log_samples)
        group = torch.tensor([e.prompt_index for e in episodes])
        objective = plan_objective(config, stage, torch.tensor(scores1),
                                   torch.tensor(scores2) if two else None, group)
        return StepShare(episodes, scores1, scores2, objective, timing, errors1 + errors2,
                         zeros1, zeros2)

    def train_step(self) -> dict:
        """One step: this rank samples and scores its prompts, every rank gets the whole
        step (StepShare.merge), one optimizer step on it; returns the step's metrics."""
        stage = stage_at(self.config, self.step)
        started = time.perf_counter()
        self.timer = PhaseTimer(self.device)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        share = self._sample_and_score(stage)
        if self.dist.enabled:  # every rank gets the whole step: episodes, scores, advantages
            share = StepShare.merge(distributed.gather_objects(share, self.dist))
        # every reward 0: every advantage is 0, no reward signal (train() warns)
        self.last_step_all_zero = not any(share.scores1) and not any(share.scores2 or ())
        train_start = time.perf_counter()
        lr = self.optimizer.param_groups[0]["lr"]  # this step's (the schedule moves after it)
        out, norm = self.optimize(share.episodes, share.objective)
        train_s = time.perf_counter() - train_start
        extra = {}
        if self.engine:
            with self.timer("engine_sync"):
                extra["engine_sync_s"] = self.sync_engine()
        extra.update(self.timer.metrics(), **memory_metrics(self.device))
        self.step += 1
        return self._step_metrics(share, out, norm, stage=stage, lr=lr, train_s=train_s,
                                  extra=extra, started=started)

    def _step_metrics(self, share: StepShare, out: dict, norm: float, *, stage: int,
                      lr: float, train_s: float, extra: dict, started: float) -> dict:
        """The metrics of the step just taken (self.step is its 1-based number)."""
        from score_fast.metrics import self_correction_metrics
        config, episodes = self.config, share.episodes
        two = share.scores2 is not None
        # the step's own samples (temperature rollout.temperature), not the paper's greedy
        # evaluation: named sample_* here and in metrics.jsonl; single_turn: acc_t1 only
        samples = {f"sample_{k}": v for k, v in self_correction_metrics(
            [s > 0 for s in share.scores1], [s > 0 for s in share.scores2] if two else None,
            [e.text1 for e in episodes] if two else None,
            [e.text2 for e in episodes] if two else None).items()}
        if self.peak_flops:  # GPU: model FLOPs of the training step over the devices' peak
            flops = step_flops(*self.flops_shape, [len(e.ids) for e in episodes])
            samples["mfu"] = flops / (max(train_s, 1e-9) * self.peak_flops * self.dist.world)
        timing = share.timing
        metrics = {
            "step": self.step, "stage": stage, "temperature": config.rollout.temperature,
            "loss": out["loss"], "reward_t1": float(np.mean(share.scores1)),
            "reward_t2": float(np.mean(share.scores2)) if two else 0.0, **samples,
            "kl_t1": out["kl_sum1"] / max(out["n1"], 1),
            "kl_t2": out["kl_sum2"] / max(out["n2"], 1),
            # the policy's entropy (at the sampling temperature) on the trained tokens
            "entropy_t1": out["ent_sum1"] / max(out["n1"], 1),
            "entropy_t2": out["ent_sum2"] / max(out["n2"], 1),
            "len_t1": float(np.mean([len(e.attempt1_ids) for e in episodes])),
            "len_t2": float(np.mean([len(e.attempt2_ids) for e in episodes])),
            "grad_norm": norm, "lr": lr, "reward_errors": share.reward_errors,
            # why rewards were 0
            "zeros_t1": dict(share.zeros1), "zeros_t2": dict(share.zeros2),
            "gen_tok_s": timing["gen_tokens"] / max(timing["gen_seconds"], 1e-9),
            "train_tok_s": out["tokens"] / max(train_s, 1e-9), **extra,
            "step_s": time.perf_counter() - started}
        if not two:  # no attempt 2 was sampled: its keys are left out, not logged as zeros
            metrics = {k: v for k, v in metrics.items() if k not in ATTEMPT2_KEYS}
        return metrics

    # ------------------------------------------------------------------ the run
    def save(self) -> str:
        state = {"stage": stage_at(self.config, self.step - 1),
                 "scheduler": self.scheduler.state_dict()}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        path = save_checkpoint(self.run_dir, self.step, self.policy, self.tokenizer,
                               self.optimizer, state, self.config_yaml, dist=self.dist,
                               merged=self.config.model.lora.save_merged)
        # after the new one is complete (save_checkpoint's rename and barrier): rotate
        if self.config.train.keep_last is not None and self.dist.main:
            rotate_checkpoints(self.run_dir, self.config.train.keep_last,
                               keep=[self.best["checkpoint"]] if self.best else ())
        return path

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Greedy two-attempt metrics of the policy on train.eval_file (score-fast eval's
        code: score_fast.evaluation), each rank a share of the rows; eval/* keys."""
        from score_fast.evaluation import Task, breakdown_metrics, greedy_attempts
        task, dist = self.eval_task, self.dist
        mine = list(range(dist.rank, len(task.rows), dist.world))
        share = Task(task.path, task.config, [task.problems[i] for i in mine],
                     [task.rows[i] for i in mine])
        with distributed.generation(self.policy, dist):
            results = greedy_attempts(self.policy, self.tokenizer, share, self.eval_reward,
                                      self.config.train.eval_max_new_tokens)
        if dist.enabled:  # back into file order: rank r holds rows r, r + world, ...
            merged = [[None] * len(task.rows) for _ in results]
            for rows, part in distributed.gather_objects((mine, results), dist):
                for column, values in zip(merged, part):
                    for i, value in zip(rows, values):
                        column[i] = value
            results = tuple(merged)
        table = breakdown_metrics(task.rows, *results)
        return {f"eval/{k}": v for k, v in table["all"].items()}

    def _is_best(self, metrics: dict) -> bool:
        name = self.config.train.best_metric
        value = metrics[f"eval/{name}"]
        if self.best is not None and self.best["metric"] == name:
            old = self.best["value"]
            if not (value > old if BEST_METRICS[name] else value < old):
                return False
        self.best = {"step": self.step, "metric": name, "value": value,
                     "checkpoint": f"checkpoint-{self.step}"}
        return True

    def _write_best(self) -> None:
        """run_dir/best.json, replaced atomically (after its checkpoint is complete)."""
        if not self.dist.main:
            return
        path = os.path.join(self.run_dir, BEST_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump(self.best, f)
        os.replace(path + ".tmp", path)

    def train(self, until: int | None = None, progress: bool = True) -> list[dict]:
        """Steps until `until` (default: the end of the schedule); checkpoints every
        save_every steps and at the end. Returns the logged metrics of this call.

        The first call logs the run's summary (run_summary; size_warning on a CPU). A run
        already at its last step (a resume of a finished run) logs so and does nothing.
        Ctrl-C closes the bar and the reporter, logs one line (the step reached, the
        checkpoint a resume continues from) and raises TrainingInterrupted."""
        from tqdm.auto import tqdm
        config, main = self.config, self.dist.main  # only rank 0 prints and writes logs
        if self.step >= self.total_steps:
            if main:
                log.info("already complete: %d steps (%s); nothing to do", self.total_steps,
                         self.run_dir)
            return []
        if not self._announced and main:
            log.info("%s", self.run_summary())
            warning = size_warning(config, self.device, self.dist.world)
            if warning:
                log.warning("%s", warning)
        self._announced = True
        end = min(self.total_steps, until if until is not None else self.total_steps)
        history = []
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not (progress and main),
                   desc="score", dynamic_ncols=True)
        # while the bar is drawn, log lines (warnings) go above it rather than into it
        above_bar = contextlib.ExitStack()
        if not bar.disable:
            from tqdm.contrib.logging import logging_redirect_tqdm
            above_bar.enter_context(logging_redirect_tqdm(tqdm_class=tqdm))
        try:
            while self.step < end:
                metrics = self.train_step()
                evaluated = self.eval_task is not None and (
                    self.step == self.total_steps
                    or config.train.eval_every and self.step % config.train.eval_every == 0)
                best = False
                if evaluated:
                    phase_start = time.perf_counter()
                    metrics.update(self.evaluate())
                    best = self._is_best(metrics)
                    metrics["time/eval_s"] = time.perf_counter() - phase_start
                    metrics["step_s"] += metrics["time/eval_s"]
                if best or self.step % config.train.save_every == 0 or self.step == end:
                    phase_start = time.perf_counter()
                    self.save()  # before the line: it is part of this step's time
                    if best:  # only once its checkpoint is complete
                        self._write_best()
                    metrics["time/checkpoint_s"] = time.perf_counter() - phase_start
                    metrics["step_s"] += metrics["time/checkpoint_s"]
                history.append(metrics)
                bar.update(1)
                if evaluated and main:
                    (bar.write if progress else log.info)(format_eval(metrics, self.best))
                if main and (evaluated or self.step % config.train.log_every == 0
                             or self.step == end):
                    self.reporter.log(self.step, metrics)
                    (bar.write if progress else log.info)(format_line(metrics))
                every = config.train.log_samples_every
                if main and every and (self.step % every == 0 or self.step == end):
                    self.reporter.log_samples(self.step, self.last_samples)
                self._note_zero_rewards(metrics)
                for callback in self.callbacks:
                    callback(self, metrics)
                if self.should_stop:
                    self.should_stop = False  # a later train() call continues
                    break
        except KeyboardInterrupt:
            above_bar.close()
            bar.close()  # the message after the bar's last line, not inside it
            self.reporter.close()  # every logged line flushed, the backends finished
            message = self._interrupted_message()
            if main:
                log.warning("%s", message)
            raise TrainingInterrupted(message) from None
        finally:
            above_bar.close()
            bar.close()
            if self.step >= self.total_steps or sys.exc_info()[0] is not None:
                self.reporter.close()  # the run's end (or its failure): flush and finish
        if main and self.step >= self.total_steps and self.zero_reward_steps and (
                self.zero_reward_steps >= max(2, self.steps_taken // 10)):
            log.warning("%d of the %d steps this run took had every reward 0, the first at "
                        "step %d: no reward signal, nothing learned from them (that step's "
                        "warning says what to check)", self.zero_reward_steps,
                        self.steps_taken, self.first_zero_step)
        return history

    def run_summary(self) -> str:
        """What the run is about to do, logged before its first step: the rows, the model's
        parameters, the step plan, where it writes, the device and dtype, and whether
        gradient checkpointing is on and why."""
        config, dist = self.config, self.dist
        trainable = sum(p.numel() for p in self.trainable)
        total = sum(p.numel() for p in self.policy.parameters())
        per_round = f"{config.stage1.steps} Stage I + {config.stage2.steps} Stage II steps"
        plan = (per_round if config.train.rounds == 1 else
                f"{config.train.rounds} rounds of {per_round}")
        start = f"from step {self.step} (resumed)" if self.step else "from step 0"
        prompts, samples = config.train.prompts_per_step, config.rollout.samples_per_prompt
        attempts = ("attempt 1 only (train.single_turn)" if config.train.single_turn
                    else "2 attempts")
        ranks = f" x {dist.world} ranks" if dist.world > 1 else ""
        model = config.model.path or "the model passed to Trainer"
        lora = f", LoRA rank {config.model.lora.rank}" if self.lora else ""
        return "\n".join([
            f"rows: {len(self.rows)} from {self.data_name}",
            f"model: {model}: {trainable:,} trainable of {total:,} parameters{lora}",
            f"plan: {plan} = {self.total_steps} steps, {start}; {prompts} prompts x {samples} "
            f"samples = {prompts * samples} episodes a step, {attempts} of up to "
            f"{config.rollout.max_new_tokens} new tokens",
            f"run_dir: {self.run_dir}; device {self.device}{ranks}, "
            f"{str(self.dtype).removeprefix('torch.')}", self.checkpointing_note])

    def _note_zero_rewards(self, metrics: dict) -> None:
        """Count a step whose every reward was 0; warn the first time and every
        ZERO_REWARD_WARN_EVERY such steps, naming the zero reasons and what to check."""
        self.steps_taken += 1
        if not self.last_step_all_zero:
            return
        self.zero_reward_steps += 1
        n = self.zero_reward_steps
        if n == 1:
            self.first_zero_step = self.step
        if not self.dist.main or (n > 1 and n % ZERO_REWARD_WARN_EVERY):
            return
        why = "; ".join(f"attempt {k} " + ", ".join(f"{r}:{c}" for r, c in
                                                    sorted(metrics[f"zeros_t{k}"].items()))
                        for k in (1, 2) if metrics.get(f"zeros_t{k}")) or "no reasons given"
        count = ("" if n == 1 else
                 f"; {n} of the {self.steps_taken} steps this run took had every reward 0")
        log.warning("step %d: every reward is 0 (%s)%s: every advantage is 0, so the step has "
                    "no reward signal and learns nothing (loss, grad norm and KL stay 0 while "
                    "the policy is the reference). %s (warned again every %d such steps)",
                    self.step, why, count, self._zero_reward_hint(), ZERO_REWARD_WARN_EVERY)

    def _zero_reward_hint(self) -> str:
        """What to check when no response earns a reward, per reward kind."""
        from score_fast.rewards import CodeReward, MathReward
        config = self.config
        samples = ("the responses are in samples.jsonl" if config.train.log_samples_every else
                   "train.log_samples_every=1 writes responses to samples.jsonl")
        if isinstance(self.reward, MathReward):
            return (f"Check the answer format the math reward expects: a final answer in "
                    f"\\boxed{{...}} or \"The final answer is X. I hope it is correct.\" "
                    f"(the prompt, data.prompt={config.data.prompt}, asks for it; "
                    f"reward.lenient_math=true also takes a last plain number), and the "
                    f"reference in the rows' {config.answer_field() or 'answer'!r} field; "
                    f"{samples}")
        if isinstance(self.reward, CodeReward):
            return (f"Check that the responses hold the program the code reward runs (a "
                    f"```python block or the function body, as the prompt, "
                    f"data.prompt={config.data.prompt}, asks) and that the rows' tests pass "
                    f"on a right program; {samples}")
        return (f"Check the reward function against a few responses and the format it "
                f"expects against what the prompt asks for; {samples}")

    def _interrupted_message(self) -> str:
        """The one line a Ctrl-C leaves: the step reached and where a resume continues."""
        from score_fast.checkpoint import latest_checkpoint
        head = f"stopped after step {self.step} of {self.total_steps} (interrupted)"
        if not self.dist.main:  # rank 0 reads the run directory and says the rest
            return head
        saved = latest_checkpoint(self.run_dir)
        if saved is None:
            if not os.path.isfile(os.path.join(self.run_dir, "metrics.jsonl")):
                return f"{head}; nothing was saved: the same command starts it over"
            return (f"{head}, before its first checkpoint (train.save_every="
                    f"{self.config.train.save_every}): nothing to resume; "
                    f"--train.overwrite=true starts it over")
        at = int(os.path.basename(saved).rsplit("-", 1)[1])
        again = ("" if at >= self.step else f"; step {self.step} is taken again"
                 if at + 1 == self.step else f"; steps {at + 1}-{self.step} are taken again")
        return (f"{head}; resume with --train.resume=true (from {os.path.basename(saved)}"
                f"{again})")


def format_eval(m: dict, best: dict | None) -> str:
    line = (f"eval step {m['step']}: acc t1 {m['eval/acc_t1']:.3f} t2 {m['eval/acc_t2']:.3f} "
            f"delta {m['eval/delta']:+.3f} i->c {m['eval/delta_i2c']:.3f} "
            f"c->i {m['eval/delta_c2i']:.3f} ({int(m['eval/n'])} problems, greedy)")
    if best:
        line += f"; best {best['metric']} {best['value']:.3f} at step {best['step']}"
    return line


def format_line(m: dict) -> str:
    """One step's console line; a train.single_turn step (no attempt-2 keys) gets attempt 1's
    numbers only, marked "(attempt 1 only)"."""
    if "reward_t2" in m:
        head = (f"r1 {m['reward_t1']:.3f} r2 {m['reward_t2']:.3f} "
                f"samples@T={m['temperature']:g}: acc t1 {m['sample_acc_t1']:.3f} "
                f"t2 {m['sample_acc_t2']:.3f} delta {m['sample_delta']:+.3f} "
                f"i->c {m['sample_delta_i2c']:.3f} c->i {m['sample_delta_c2i']:.3f} "
                f"edit {m.get('sample_edit_ratio', math.nan):.3f} KL t1 {m['kl_t1']:.4f} "
                f"t2 {m['kl_t2']:.4f} entropy {m['entropy_t1']:.3f}/{m['entropy_t2']:.3f} "
                f"len {m['len_t1']:.1f}/{m['len_t2']:.1f} ")
    else:
        head = (f"(attempt 1 only) r1 {m['reward_t1']:.3f} "
                f"samples@T={m['temperature']:g}: acc t1 {m['sample_acc_t1']:.3f} "
                f"KL t1 {m['kl_t1']:.4f} entropy {m['entropy_t1']:.3f} len {m['len_t1']:.1f} ")
    return (f"step {m['step']} stage {m['stage']} loss {m['loss']:.4f} " + head
            + f"tok/s gen {m['gen_tok_s']:.0f} train {m['train_tok_s']:.0f} "
            f"lr {m['lr']:.3g} {m['step_s']:.2f}s"
            + (f" MFU {100 * m['mfu']:.1f}%" if "mfu" in m else "")
            + (f" reward_errors {m['reward_errors']}" if m["reward_errors"] else "")
            + "".join(f" zeros t{k} " + ",".join(f"{r}:{n}" for r, n in
                                                 sorted(m[f"zeros_t{k}"].items()))
                      for k in (1, 2) if m.get(f"zeros_t{k}")))

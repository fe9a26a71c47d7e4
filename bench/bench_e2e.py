"""End to end: one RL training step of score_fast against TRL's GRPOTrainer, side by side in
one run: same model files, tokenizer, prompts, reward, samples, lengths, temperature, beta
and optimizer (Adam, lr 1e-5, no weight decay, clip 1.0).

  trl             TRL 1.16 GRPOTrainer, HF generate, its own loss (chunked log-prob head)
  trl_fused       the same trainer with score_fast's loss (integrations.trl.FusedGRPOTrainer)
  sf_single_turn  score_fast train.single_turn: sample, score and train attempt 1 only (the
                  like-for-like row: GRPO's work, one attempt per episode)
  sf_two_turn     score_fast Stage II: two attempts per episode, both trained (SCoRe's work)
  sf_vllm         sf_two_turn with rollout.backend=vllm (where vLLM is installed)

    bash bench/run.sh bench/bench_e2e.py
    SCORE_FAST_BENCH_E2E_SHAPES=tiny bash bench/run.sh bench/bench_e2e.py   # one shape

Shapes (random weights, a character tokenizer padded to the model's vocabulary with tokens
only the model samples): tiny, a 5.2M-parameter Llama (hidden 256, 3 layers, vocabulary
4096); vocab32k, the same body under a 32,000-token vocabulary (the LM head is 42% of the
19.5M parameters). 8 arithmetic prompts x 4 samples a step, 64 new tokens (random weights
rarely sample eos: most attempts run the full 64), temperature 1, beta 0.04 (the reference
model on), fp32; CUDA: bf16 and Qwen2.5-0.5B's vocabulary (151,936) on the tiny body.
The attempt-2 instruction is the paper's MATH instruction cut to its first two sentences
(129 characters): the character tokenizer spells every character as a token, so the whole
337-character instruction would cost 337 tokens per episode where a BPE tokenizer (about
4-5 characters a token) spends about 75.

Each timed call is one full step: rollouts, rewards, reference forward, loss, backward and
the optimizer. extra_info: gen_tokens (sampled), trained_tokens (with a loss term),
fwd_tokens (through the policy's training forward: TRL pads each row to prompt + longest
completion, score_fast packs), their rates per second of the median step, the phase split
(gen_s: sampling; other_s: rewards, reference and old log-probs, bookkeeping; train_s:
policy forward + backward + optimizer) of the last timed step, and peak_mem (the resident
set's growth over one step). The ratio column is per step; per trained token, compare
trained_tok_s (two_turn trains about twice the tokens of a step of the others)."""
import contextlib
import os
import time
import types

import pytest
import torch
import transformers

from harness import QUICK, bench_device, run

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")

from score_fast.demo import task as demo_task  # noqa: E402
from score_fast.config import Config  # noqa: E402
from score_fast.trainer import Trainer  # noqa: E402

DEVICE = bench_device()
SHAPES = {"tiny": 4096, "vocab32k": 32000}
if DEVICE == "cuda":
    SHAPES = {"tiny": 4096, "vocab152k": 151936}
PICK = os.environ.get("SCORE_FAST_BENCH_E2E_SHAPES")
SHAPES = {k: v for k, v in SHAPES.items() if not PICK or k in PICK.split(",")}
HIDDEN, LAYERS = (64, 1) if QUICK else (256, 3)
PROMPTS, SAMPLES, NEW = (2, 2, 8) if QUICK else (8, 4, 64)
BETA, LR = 0.04, 1e-5
INSTRUCTION = ("There might be an error in the solution above because of lack of understanding "
               "of the question. Please correct the error, if any.")
ROUNDS, WARMUP = (1, 1) if QUICK else (6, 2)
PROVIDERS = ["trl", "trl_fused", "sf_single_turn", "sf_two_turn", "sf_vllm"]
DTYPE = torch.bfloat16 if DEVICE == "cuda" else torch.float32


@pytest.fixture(scope="module", params=list(SHAPES))
def shape(request, tmp_path_factory):
    """The model files and data every provider of one shape loads."""
    vocab = SHAPES[request.param]
    path = tmp_path_factory.mktemp(f"e2e_{request.param}")
    tok = demo_task.build_tokenizer(vocab)
    cfg = demo_task.tiny_model_config(tok, hidden=HIDDEN, layers=LAYERS, heads=HIDDEN // 64 * 2,
                                      max_positions=512)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(cfg).to(DTYPE).save_pretrained(path / "model")
    tok.save_pretrained(path / "model")
    rows = demo_task.make_problems(64, seed=0)
    params = sum(p.numel() for p in transformers.LlamaForCausalLM(cfg).parameters())
    return types.SimpleNamespace(name=request.param, vocab=vocab, path=path, tok=tok,
                                 rows=rows, params=params)


class _Clock:
    """Seconds spent inside wrapped methods during one step."""

    def __init__(self):
        self.s = {}

    def wrap(self, obj, name, key):
        fn = getattr(obj, name)

        def timed(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.s[key] = self.s.get(key, 0.0) + time.perf_counter() - t
        setattr(obj, name, timed)


def _trl_step_fn(sh, fused):
    from score_fast.integrations.trl import FusedGRPOTrainer
    prompts = [sh.tok.apply_chat_template([{"role": "user", "content": r["problem"]}],
                                          tokenize=False, add_generation_prompt=True)
               for r in sh.rows]
    ds = datasets.Dataset.from_list([{"prompt": p, "answer": r["answer"]}
                                     for p, r in zip(prompts, sh.rows)])
    args = trl.GRPOConfig(
        output_dir=str(sh.path / "trl_out"), per_device_train_batch_size=PROMPTS * SAMPLES,
        num_generations=SAMPLES, max_completion_length=NEW, temperature=1.0, beta=BETA,
        learning_rate=LR, optim="adamw_torch", weight_decay=0.0, max_grad_norm=1.0,
        lr_scheduler_type="constant", report_to=[], save_strategy="no",
        use_cpu=DEVICE == "cpu", bf16=DEVICE == "cuda", seed=0,
        model_init_kwargs={"dtype": DTYPE})
    cls = FusedGRPOTrainer if fused else trl.GRPOTrainer
    tr = cls(model=str(sh.path / "model"), reward_funcs=demo_task.exact_reward, args=args,
             train_dataset=ds, processing_class=sh.tok)
    tr.create_optimizer_and_scheduler(num_training_steps=1000)
    tr.current_gradient_accumulation_steps = 1
    loader = tr.get_train_dataloader()
    batches = (b for _ in range(10**6) for b in loader)  # epochs of 64 prompts, 8 a step
    clock, seen = _Clock(), {}
    clock.wrap(tr, "_generate", "gen_s")
    clock.wrap(tr, "_generate_and_score_completions", "prep_s")
    inner = tr._generate_and_score_completions

    def keep(*a, **k):  # the step's token counts
        out = inner(*a, **k)
        m = out["completion_mask"]
        seen.update(gen_tokens=int(m.sum()), trained_tokens=int(m.sum()),
                    fwd_tokens=int(out["prompt_ids"].numel() + m.numel()))
        return out
    tr._generate_and_score_completions = keep

    def step():
        clock.s.clear()
        t = time.perf_counter()
        tr.model.train()
        tr.training_step(tr.model, next(batches), None)
        torch.nn.utils.clip_grad_norm_(tr.model.parameters(), 1.0)
        tr.optimizer.step()
        tr.lr_scheduler.step()
        tr.model.zero_grad(set_to_none=True)
        total = time.perf_counter() - t
        gen, prep = clock.s.get("gen_s", 0.0), clock.s.get("prep_s", 0.0)
        seen.update(step_s=total, gen_s=gen, other_s=prep - gen, train_s=total - prep)
    return step, seen


def _sf_step_fn(sh, single_turn, backend="hf"):
    if backend == "vllm":
        pytest.importorskip("vllm")
    c = Config()
    c.model.path = str(sh.path / "model")  # vLLM loads from files; hf loads the same ones
    c.model.dtype = "bf16" if DEVICE == "cuda" else "fp32"
    c.train.run_dir = str(sh.path / f"sf_{single_turn}_{backend}")
    c.train.overwrite = True
    c.train.prompts_per_step, c.rollout.samples_per_prompt = PROMPTS, SAMPLES
    c.rollout.max_new_tokens, c.rollout.temperature = NEW, 1.0
    c.rollout.backend, c.rollout.instruction = backend, INSTRUCTION
    c.stage1.steps, c.stage2.steps = 0, 1000
    c.stage2.beta1, c.train.lr, c.train.max_grad_norm = BETA, LR, 1.0
    c.train.single_turn = single_turn
    c.train.report_to, c.train.save_every = [], 10**6
    c.reward.kind = "custom"
    tr = Trainer(c, rows=sh.rows, reward=demo_task.exact_reward)
    seen = {}
    rollouts = tr.rollouts

    def keep(step):  # the step's packed tokens: every episode's ids, once
        episodes, rows, timing = rollouts(step)
        seen["fwd_tokens"] = sum(len(e.ids) for e in episodes)
        return episodes, rows, timing
    tr.rollouts = keep

    def step():
        t = time.perf_counter()
        m = tr.train_step()
        total = time.perf_counter() - t
        gen = m.get("time/attempt1_s", 0.0) + m.get("time/attempt2_s", 0.0)
        train = sum(v for k, v in m.items() if k.startswith("time/") and k.endswith("_s")
                    and k not in ("time/attempt1_s", "time/attempt2_s", "time/rewards_s",
                                  "time/reference_s"))
        n = PROMPTS * SAMPLES
        trained = round(n * (m["len_t1"] + m.get("len_t2", 0.0)))
        seen.update(step_s=total, gen_s=gen, train_s=train, other_s=total - gen - train,
                    gen_tokens=trained, trained_tokens=trained,
                    phases={k[5:-2]: v for k, v in m.items()
                            if k.startswith("time/") and k.endswith("_s")},
                    len_t1=m["len_t1"], len_t2=m.get("len_t2", 0.0))
    seen["trainer"] = tr
    return step, seen


def _predicted(tr, seen) -> dict:
    """score_fast.steptime's phase times for this step on this host's measured rates
    (fp32 matmul, copy bandwidth, op dispatch), at the step's own mean lengths, and the
    measured / predicted ratio of each (score_fast rows only)."""
    from score_fast import steptime
    from score_fast.memory import StepShape
    episodes = PROMPTS * SAMPLES
    lengths = [len(tr.formatter.prompt_ids(t)) for t in tr.prompt_texts]
    rates = steptime.measure_host(threads=torch.get_num_threads())
    shape = StepShape(max_tokens=tr.config.train.max_tokens, episodes=episodes,
                      gen_batch_size=episodes, in_flight=episodes,
                      prompt_tokens=round(sum(lengths) / len(lengths)),
                      max_new_tokens=NEW, instruction_tokens=tr.instruction_tokens)
    cfg = tr.policy.config
    phases = {p.name: p for p in steptime.predict_time(cfg, rates, shape=shape, dtype="fp32")}
    if tr.config.train.single_turn:
        phases.pop("attempt 2")
    measured = {"attempt 1": seen["phases"].get("attempt1", 0.0),
                "attempt 2": seen["phases"].get("attempt2", 0.0),
                "reference forward": seen["phases"].get("reference", 0.0),
                "policy fwd+bwd": seen["phases"].get("policy", 0.0),
                "optimizer": seen["phases"].get("optimizer", 0.0)}
    out = {}
    for name, m in measured.items():
        if name in phases:
            key = name.split()[0] + ("2" if name == "attempt 2" else "")
            out[f"pred_{key}_s"] = round(phases[name].seconds, 3)
            out[f"meas_{key}_s"] = round(m, 3)
    return out


@pytest.mark.parametrize("provider", PROVIDERS)
def test_e2e_step(benchmark, provider, shape):
    if provider.startswith("trl"):
        step, seen = _trl_step_fn(shape, fused=provider == "trl_fused")
    else:
        step, seen = _sf_step_fn(shape, single_turn=provider == "sf_single_turn",
                                 backend="vllm" if provider == "sf_vllm" else "hf")
    torch.manual_seed(0)
    with contextlib.suppress(AttributeError):
        torch.use_deterministic_algorithms(False)
    steps = []

    def fn():
        step()
        steps.append(dict(seen))
    run(benchmark, fn, device=DEVICE, provider=provider, baseline="trl",
        shape=f"{shape.name}: {shape.params / 1e6:.1f}M params V={shape.vocab} "
              f"{PROMPTS}x{SAMPLES} new={NEW}",
        dtype="bf16" if DEVICE == "cuda" else "fp32", rounds=ROUNDS, warmup=WARMUP)
    timed = steps[-ROUNDS:]  # the peak-memory call and warm-up steps come first
    med = sorted(s["step_s"] for s in timed)[len(timed) // 2]
    last = timed[-1]
    tot = {k: sum(s[k] for s in timed) for k in ("gen_tokens", "trained_tokens",
                                                 "fwd_tokens", "step_s", "gen_s")}
    benchmark.extra_info.update(
        s_per_step=round(med, 3),
        gen_tok_s=round(tot["gen_tokens"] / max(tot["gen_s"], 1e-9)),
        trained_tok_s=round(tot["trained_tokens"] / tot["step_s"]),
        trained_per_step=round(tot["trained_tokens"] / len(timed)),
        fwd_per_step=round(tot["fwd_tokens"] / len(timed)),
        gen_s=round(last["gen_s"], 3), other_s=round(last["other_s"], 3),
        train_s=round(last["train_s"], 3))
    if "trainer" in seen:
        benchmark.extra_info.update(_predicted(seen["trainer"], last))

"""`score-fast demo`: the whole SCoRe pipeline on a toy task, on a CPU, in a few minutes.

    score-fast demo [--run_dir runs/demo]

1. A tiny Llama (score_fast.demo.task.tiny_model_config) and a character tokenizer.
2. Supervised warm-up (teacher forcing) on two-turn transcripts of one-digit "a+b" / "a-b"
   problems (all 200 of them), standing in for pre-training:
     attempt 1: on the 82 "hard" problems it makes a systematic slip 80% of the time (a
       negative difference loses its sign, a two-digit sum has its digits swapped: see
       `corrupt`), elsewhere it is right;
     attempt 2: mostly a copy of attempt 1; with probability p_fix a wrong attempt 1 is
       fixed, with probability p_break a right one is broken.
   With p_fix = p_break < 0.5 the greedy base model (nearly) copies attempt 1: it does not
   self-correct. Its *sampled* second attempts sometimes change the answer, both ways,
   and more often right -> wrong than wrong -> right (most first attempts are right), as
   the paper's base models do. Those changes are the exploration RL needs: a model that
   only ever copies (the previous demo) gives Stage I/II nothing to reward in attempt 2.
3. Stage I then Stage II through the same Trainer as `score-fast train` (the warmed-up
   model is saved as run_dir/base and is the run's model.path, i.e. the reference). RL
   trains on 150 of the 200 problems ("RL-train"); the other 50 ("held-out") are never
   seen by RL, only by the warm-up (as a test set is covered by pre-training knowledge).
4. A greedy two-attempt evaluation after each phase, printed as the paper's table, on the
   RL-train problems and on the held-out problems separately.

What the table shows: whether RL turned "copy attempt 1" into "fix attempt 1 when it is
wrong, keep it when it is right" under greedy decoding. The same model writes both
attempts, and attempt 1 could in principle also learn to stop slipping; the difference
comes from the method (Stage I trains attempt 2 only and holds attempt 1 near the base
with the beta2 KL; Stage II's bonus alpha (r2 - r1) rewards wrong -> right 11x more than
keeping a right answer). It is a toy: one-digit problems, a tiny model, a few hundred RL
steps, and a slip that is visible in the answer; the held-out table says whether the
learned correction carries to problems RL never trained on.
"""
from __future__ import annotations

import json
import os
import random
import time

import torch

from score_fast.demo import task as demo_task
from score_fast.config import (Config, DataConfig, ModelConfig, RewardConfig, RolloutConfig,
                               Stage1Config, Stage2Config, TrainConfig)
from score_fast.rollout import Episode, Formatter

__all__ = ["run_demo", "warm_up", "demo_config", "write_problems", "warmup_transcripts",
           "demo_rows", "split_rows", "corrupt", "held_out_heading"]


_PROMPTS: dict = {}


def corrupt(row: dict) -> str | None:
    """The warm-up's systematic slip on a "hard" problem, or None for the others: a negative
    difference loses its sign ("3-7" -> "4"), a two-digit sum has its digits swapped
    ("9+8" -> "71"; 11 has no swapped form, so 2+9 etc. are not hard). 82 of the 200
    problems (41%) are hard. The slip is visible in the answer text itself, so fixing it
    is a rule a model can learn once and apply to problems it never trained on."""
    ans = row["answer"]
    if ans.startswith("-"):
        return ans[1:]
    if len(ans) == 2 and ans[::-1] != ans:
        return ans[::-1]
    return None


def demo_rows() -> list[dict]:
    """All 200 one-digit problems a+b, a-b (a, b in 0..9)."""
    return [{"problem": f"{a}{op}{b}", "answer": str(a + b if op == "+" else a - b)}
            for a in range(10) for b in range(10) for op in "+-"]


def split_rows(rows: list[dict], held_out: int, seed: int = 1234) -> tuple[list, list]:
    """(RL-train, held-out): a fixed random `held_out` rows aside (same split every seed)."""
    idx = list(range(len(rows)))
    random.Random(seed).shuffle(idx)
    out = set(idx[:held_out])
    return ([r for i, r in enumerate(rows) if i not in out],
            [r for i, r in enumerate(rows) if i in out])


def _off_by_one(ans: str, rng: random.Random) -> str:
    return str(int(ans) + rng.choice((-1, 1)))


def warmup_transcripts(rows, formatter: Formatter, tokenizer, rng: random.Random,
                       p_wrong: float = 0.8, p_fix: float = 0.0,
                       p_break: float = 0.0) -> list[Episode]:
    """One two-turn transcript per row (the layout rollout.py produces). On a hard row
    attempt 1 makes the row's slip (`corrupt`) with probability p_wrong; attempt 2 copies
    attempt 1, except that a wrong attempt 1 is fixed with probability p_fix and a right
    one broken with probability p_break (into the slip on a hard row, off by one on others)."""
    eos = tokenizer.eos_token_id

    def ids(text: str) -> list[int]:
        return [tokenizer.convert_tokens_to_ids(ch) for ch in text] + [eos]  # char tokenizer

    out = []
    for i, r in enumerate(rows):
        right, slip = r["answer"], corrupt(r)
        a1 = slip if slip is not None and rng.random() < p_wrong else right
        if a1 != right:
            a2 = right if rng.random() < p_fix else a1
        elif rng.random() < p_break:
            a2 = slip if slip is not None else _off_by_one(right, rng)
        else:
            a2 = a1
        a1_ids = ids(a1)
        prompt = _PROMPTS.setdefault(r["problem"], formatter.prompt_ids(r["problem"]))
        out.append(Episode(i, prompt, a1_ids, formatter.instruction_ids(r["problem"], a1_ids),
                           ids(a2)))
    return out


WARMUP_BATCH = 64  # transcripts a warm-up step


def _warmup(model, episodes_fn, steps: int, batch: int, lr: float, report=None,
            every: int = 100) -> float:
    """Teacher forcing on the attempt tokens (labels > 0), padded batches. report(step,
    loss) after every `every` steps but the last."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for step in range(1, steps + 1):
        eps = episodes_fn(batch)
        width = max(len(e.ids) for e in eps)
        ids = torch.zeros(len(eps), width, dtype=torch.long)
        labels = torch.full((len(eps), width), -100, dtype=torch.long)
        for i, e in enumerate(eps):
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            keep = torch.tensor(e.labels) > 0
            labels[i, :len(e.ids)] = torch.where(keep, torch.tensor(e.ids), -100)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if report is not None and step % every == 0 and step < steps:
            report(step, loss.item())
    return loss.item()


def warm_up(run_dir: str, rows: list[dict], *, seed: int = 0, steps: int = 600,
            p_fix: float = 0.25, p_break: float = 0.25, say=print, every: int = 100) -> str:
    """The supervised warm-up (module doc, step 2) on `rows`; saves the model and tokenizer
    to run_dir/base and returns that path. Says its progress every `every` steps."""
    import transformers
    t0 = time.perf_counter()
    torch.manual_seed(seed)
    tok = demo_task.build_tokenizer()
    model = transformers.LlamaForCausalLM(demo_task.tiny_model_config(tok, hidden=128))
    fmt = Formatter(tok, demo_task.DEMO_INSTRUCTION)
    rng = random.Random(seed)
    say(f"warm-up: {steps} supervised steps on all {len(rows)} problems ...")
    progress = lambda step, loss: say(  # noqa: E731
        f"warm-up: step {step}/{steps}, loss {loss:.3f}, {time.perf_counter() - t0:.0f} s")
    loss = _warmup(model, lambda n: warmup_transcripts(rng.sample(rows, n), fmt, tok, rng,
                                                       p_fix=p_fix, p_break=p_break),
                   steps, WARMUP_BATCH, 3e-3, report=progress, every=every)
    base = os.path.join(run_dir, "base")
    model.save_pretrained(base)
    tok.save_pretrained(base)
    say(f"warm-up done (loss {loss:.3f}, {time.perf_counter() - t0:.0f} s); base model in {base}")
    return base


def demo_config(base: str, train_file: str, run_dir: str, *, seed: int = 0,
                stage1_steps: int = 60, stage2_steps: int = 60, samples_per_prompt: int = 8,
                prompts_per_step: int = 16, lr: float = 1e-4, max_tokens: int = 2048,
                rollout_backend: str = "hf") -> Config:
    """The demo's run configuration (also the ablations' starting point)."""
    # Not the paper's values, chosen for this toy by measurement (seed 0, one warm-up):
    # lr 1e-4 (2e-4 and 3e-4 gave a larger Delta after Stage I but Stage II then undid it;
    # 2e-3 collapsed the earlier demo); 8 samples per prompt (the RLOO baseline; with 4
    # Stage II kept Delta +3.3 instead of +6.0). alpha, beta1, beta2 are the paper's.
    # max_tokens 2048: with varlen attention (score_fast.attention) fewer, larger packs are
    # cheaper; an RL step of 128 episodes took 0.63 s vs 0.83 s with 512 (1 thread).
    return Config(
        model=ModelConfig(path=base),
        data=DataConfig(train_file=train_file),
        rollout=RolloutConfig(samples_per_prompt=samples_per_prompt, max_new_tokens=4,
                              instruction=demo_task.DEMO_INSTRUCTION,
                              backend=rollout_backend),
        reward=RewardConfig(kind="custom", function="score_fast.demo.task:exact_reward"),
        stage1=Stage1Config(steps=stage1_steps),
        stage2=Stage2Config(steps=stage2_steps),
        # overwrite: running the demo (or an ablation arm) again starts it over
        train=TrainConfig(run_dir=run_dir, seed=seed, prompts_per_step=prompts_per_step,
                          lr=lr, max_tokens=max_tokens, save_every=10**9, log_every=10,
                          overwrite=True))


def write_problems(run_dir: str, held_out: int = 50) -> tuple[str, list[dict], list[dict]]:
    """(path of the RL-train JSONL, RL-train rows, held-out rows)."""
    train_rows, test_rows = split_rows(demo_rows(), held_out)
    os.makedirs(run_dir, exist_ok=True)
    data = os.path.join(run_dir, "problems.jsonl")  # RL-train problems only
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in train_rows)
    return data, train_rows, test_rows


def held_out_heading(n_held_out: int, n_rows: int, warmup_steps: int | None) -> str:
    """The held-out table's heading: RL never sampled these problems, but the warm-up
    (warm_up on all the rows, every step WARMUP_BATCH transcripts drawn from all of them)
    trained on them as on the rest. warmup_steps None: a given base model, whose warm-up
    did not run here."""
    if warmup_steps is None:
        seen = ("but the given base model's warm-up may have trained on them (warm_up "
                "trains on all the problems)")
    else:
        seen = (f"but in the warm-up like all {n_rows}: {warmup_steps} steps x {WARMUP_BATCH} "
                f"transcripts drawn from all of them, "
                f"~{warmup_steps * WARMUP_BATCH / n_rows:.0f} of each problem; so they test "
                f"whether RL's correction carries to problems RL did not train on, not to "
                f"unseen problems")
    return f"held-out problems ({n_held_out}; never seen by RL, {seen})"


def run_demo(run_dir: str = "runs/demo", *, warmup_steps: int = 600, stage1_steps: int = 60,
             stage2_steps: int = 60, seed: int = 0, quiet: bool = False,
             p_fix: float = 0.25, p_break: float = 0.25, held_out: int = 50,
             samples_per_prompt: int = 8, prompts_per_step: int = 16, lr: float = 1e-4,
             max_tokens: int = 2048, base: str | None = None,
             rollout_backend: str = "hf") -> dict:
    """Run the demo; returns {"base" | "after Stage I" | "after Stage II": metrics} on the
    RL-train problems, plus the same keys prefixed "held-out " when held_out > 0.
    `base`: an existing warmed-up model directory to start from (skips the warm-up).
    rollout_backend: rollout.backend of the RL stages (hf | vllm); evaluation uses hf."""
    from score_fast.evaluation import evaluate_greedy, make_task
    from score_fast.metrics import format_table
    from score_fast.rewards import make_reward_from
    from score_fast.trainer import Trainer
    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else print
    # The model's matrices are ~64 x 128: a second intra-op thread only adds sync, and on a
    # shared 2-core machine it made a warm-up step 11x slower (1.7 s vs 0.15 s, measured).
    torch.set_num_threads(1)
    rows = demo_rows()
    data, train_rows, test_rows = write_problems(run_dir, held_out)
    warmed = base is None  # the warm-up runs here, on all the rows
    if base is None:
        base = warm_up(run_dir, rows, seed=seed, steps=warmup_steps, p_fix=p_fix,
                       p_break=p_break, say=say)
    config = demo_config(base, data, os.path.join(run_dir, "score"), seed=seed,
                         stage1_steps=stage1_steps, stage2_steps=stage2_steps,
                         samples_per_prompt=samples_per_prompt,
                         prompts_per_step=prompts_per_step, lr=lr, max_tokens=max_tokens,
                         rollout_backend=rollout_backend)
    tok = demo_task.build_tokenizer()
    reward = make_reward_from(config)
    trainer = Trainer(config)
    table: dict = {}

    splits = {"": make_task(train_rows, config, "the RL-train problems")}
    if test_rows:
        splits["held-out "] = make_task(test_rows, config, "the held-out problems")

    def measure(phase: str) -> None:  # greedy, both attempts (score_fast.evaluation)
        for prefix, task in splits.items():
            table[prefix + phase] = evaluate_greedy(trainer.policy, tok, task, reward,
                                                    progress=False)["all"]

    measure("base")
    trainer.train(until=stage1_steps, progress=not quiet)
    measure("after Stage I")
    trainer.train(progress=not quiet)
    measure("after Stage II")
    phases = ("base", "after Stage I", "after Stage II")
    text = (f"RL-train problems ({len(train_rows)}; RL trained on these, the warm-up saw all "
            f"{len(rows)}):\n" + format_table({k: table[k] for k in phases}))
    if test_rows:
        heading = held_out_heading(len(test_rows), len(rows), warmup_steps if warmed else None)
        text += f"\n\n{heading}:\n" + format_table({k: table["held-out " + k] for k in phases})
    text += ("\n\nGreedy attempts. Self-correction = Delta > 0 with Delta_i->c > Delta_c->i; "
             "the base model\nwas warmed up to (mostly) copy its first attempt.")
    with open(os.path.join(run_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    say(text)
    say(f"demo finished in {time.perf_counter() - t0:.0f} s; run directory {run_dir}")
    return table

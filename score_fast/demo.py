"""`score-fast demo`: the whole SCoRe pipeline on a toy task, on a CPU, in a few minutes.

    score-fast demo [--run_dir runs/demo]

1. A tiny Llama (score_fast.demo_task.tiny_model_config) and a character tokenizer.
2. Supervised warm-up (teacher forcing) on two-turn transcripts of one-digit "a+b" / "a-b"
   problems: on a fixed 40% of the problems ("hard" ones) attempt 1 is wrong 80% of the
   time (the answer off by one), elsewhere right; attempt 2 always copies attempt 1. The
   base model therefore answers right on about 60-70% of problems and never self-corrects.
3. Stage I then Stage II through the same Trainer as `score-fast train` (the warmed-up
   model is saved as run_dir/base and is the run's model.path, i.e. the reference).
4. A greedy two-attempt evaluation after each phase, printed as the paper's table.

The evaluation problems are the training problems (the task has only 200 of them): the demo
shows the self-correction mechanics, not generalisation."""
from __future__ import annotations

import json
import os
import random
import time

import torch

from score_fast import demo_task
from score_fast.config import (Config, DataConfig, ModelConfig, RewardConfig, RolloutConfig,
                               Stage1Config, Stage2Config, TrainConfig)
from score_fast.rollout import Episode, Formatter

__all__ = ["run_demo", "warmup_transcripts"]


_PROMPTS: dict = {}


def _hard(row: dict) -> bool:
    return sum(map(ord, row["problem"])) % 5 < 2  # a fixed 40% of the problems


def warmup_transcripts(rows, formatter: Formatter, tokenizer, rng: random.Random,
                       p_wrong: float = 0.8) -> list[Episode]:
    """One two-turn transcript per row (the layout rollout.py produces), attempt 2 = attempt 1."""
    eos = tokenizer.eos_token_id
    out = []
    for i, r in enumerate(rows):
        ans = r["answer"]
        if _hard(r) and rng.random() < p_wrong:
            ans = str(int(ans) + rng.choice((-1, 1)))
        a = [tokenizer.convert_tokens_to_ids(ch) for ch in ans] + [eos]  # char tokenizer
        prompt = _PROMPTS.setdefault(r["problem"], formatter.prompt_ids(r["problem"]))
        out.append(Episode(i, prompt, a, formatter.instruction_ids(r["problem"], a), list(a)))
    return out


def _warmup(model, episodes_fn, steps: int, batch: int, lr: float) -> float:
    """Teacher forcing on the attempt tokens (labels > 0), padded batches."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    model.train()
    loss = torch.tensor(0.0)
    for _ in range(steps):
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
    return loss.item()


def run_demo(run_dir: str = "runs/demo", *, warmup_steps: int = 600, stage1_steps: int = 30,
             stage2_steps: int = 60, seed: int = 0, quiet: bool = False) -> dict:
    """Run the demo; returns {"base" | "after Stage I" | "after Stage II": metrics}."""
    import transformers

    from score_fast.metrics import format_table
    from score_fast.trainer import Trainer, evaluate, make_reward_from
    t0 = time.perf_counter()
    say = (lambda *a: None) if quiet else print
    os.makedirs(run_dir, exist_ok=True)
    # The model's matrices are ~64 x 128: a second intra-op thread only adds sync, and on a
    # shared 2-core machine it made a warm-up step 11x slower (1.7 s vs 0.15 s, measured).
    torch.set_num_threads(1)
    torch.manual_seed(seed)
    tok = demo_task.build_tokenizer()
    model = transformers.LlamaForCausalLM(demo_task.tiny_model_config(tok, hidden=128))
    rows = [{"problem": f"{a}{op}{b}", "answer": str(a + b if op == "+" else a - b)}
            for a in range(10) for b in range(10) for op in "+-"]
    data = os.path.join(run_dir, "problems.jsonl")
    with open(data, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    fmt = Formatter(tok, demo_task.DEMO_INSTRUCTION)
    rng = random.Random(seed)
    say(f"warm-up: {warmup_steps} supervised steps on {len(rows)} problems ...")
    loss = _warmup(model, lambda n: warmup_transcripts(rng.sample(rows, n), fmt, tok, rng),
                   warmup_steps, 64, 3e-3)
    base = os.path.join(run_dir, "base")
    model.save_pretrained(base)
    tok.save_pretrained(base)
    say(f"warm-up done (loss {loss:.3f}, {time.perf_counter() - t0:.0f} s); base model in {base}")

    config = Config(
        model=ModelConfig(path=base),
        data=DataConfig(train_file=data),
        rollout=RolloutConfig(samples_per_prompt=4, max_new_tokens=4,
                              instruction=demo_task.DEMO_INSTRUCTION),
        reward=RewardConfig(kind="custom", function="score_fast.demo_task:exact_reward"),
        stage1=Stage1Config(steps=stage1_steps),
        stage2=Stage2Config(steps=stage2_steps),
        train=TrainConfig(run_dir=os.path.join(run_dir, "score"), seed=seed,
                          prompts_per_step=16, lr=1e-4, save_every=10**9, log_every=10))
    reward = make_reward_from(config)
    trainer = Trainer(config)
    table = {"base": evaluate(trainer.policy, tok, config, rows, reward)}
    trainer.train(until=stage1_steps, progress=not quiet)
    table["after Stage I"] = evaluate(trainer.policy, tok, config, rows, reward)
    trainer.train(progress=not quiet)
    table["after Stage II"] = evaluate(trainer.policy, tok, config, rows, reward)
    text = format_table(table)
    with open(os.path.join(run_dir, "table.md"), "w") as f:
        f.write(text + "\n")
    say(text)
    say(f"demo finished in {time.perf_counter() - t0:.0f} s; run directory {run_dir}")
    return table

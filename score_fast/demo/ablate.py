"""`score-fast ablate`: the paper's ablation table (Table 4, plus its baselines) in miniature,
on the built-in demo task (score_fast.demo.experiment), several seeds per variant.

    score-fast ablate [--seeds 0 1 2] [--quick] [--out runs/ablate] [--workers 2]

Per seed one warm-up (the same base model for every variant of that seed), then each
variant trains from it with the same number of RL steps (n1 + n2), the same rollouts per
step and the same seed, and is evaluated greedily with two attempts:

  base                 no RL: the warmed-up model, prompted to self-correct
  single-turn RL       REINFORCE + KL on attempt 1 only, n1 + n2 steps, whose rollouts
                       sample attempt 1 only (train.single_turn; Table 4 "without
                       multi-turn training"); evaluated with two attempts like the rest
  naive multi-turn RL  the Stage II objective from the start, alpha = 0
  SCoRe w/o Stage I    the Stage II objective (alpha = 10) from the start
  SCoRe w/o shaping    Stage I, then Stage II with alpha = 0
  STaR in Stage II     Stage I, then SFT on the step's own wrong -> right corrections
                       (stage2.method = star)
  SCoRe                Stage I (n1 steps), then Stage II (n2 steps, alpha = 10)

Writes out/results.json (every seed's metrics), out/table.md (mean and std over seeds, on
the RL-train problems and on the held-out ones) and out/ablation.png (matplotlib)."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from concurrent.futures import ProcessPoolExecutor

__all__ = ["VARIANTS", "Variant", "variant_config", "run_ablation", "summarize",
           "format_summary", "plot"]

METRICS = ("acc_t1", "acc_t2", "delta", "delta_i2c", "delta_c2i", "edit_ratio")
HEADERS = ("Acc@t1", "Acc@t2", "Delta", "i->c", "c->i", "edit ratio")


@dataclasses.dataclass(frozen=True)
class Variant:
    name: str
    rl: bool = True
    stage1: bool = True  # n1 Stage I steps first (else n1 + n2 Stage II steps)
    alpha: float = 10.0
    single_turn: bool = False
    method: str = "reinforce"


VARIANTS = (
    Variant("base", rl=False),
    Variant("single-turn RL", stage1=False, alpha=0.0, single_turn=True),
    Variant("naive multi-turn RL", stage1=False, alpha=0.0),
    Variant("SCoRe w/o Stage I", stage1=False),
    Variant("SCoRe w/o shaping", alpha=0.0),
    Variant("STaR in Stage II", method="star"),
    Variant("SCoRe"),
)


def variant_config(variant: Variant, base: str, train_file: str, run_dir: str, seed: int,
                   n1: int, n2: int, **demo):
    """The demo's config with the variant's changes; the same total of n1 + n2 RL steps."""
    from score_fast.demo.experiment import demo_config
    s1, s2 = (n1, n2) if variant.stage1 else (0, n1 + n2)
    c = demo_config(base, train_file, run_dir, seed=seed, stage1_steps=s1, stage2_steps=s2,
                    **demo)
    c.stage2.alpha = variant.alpha
    c.stage2.method = variant.method
    c.train.single_turn = variant.single_turn
    return c


def _job(args) -> dict:
    """One (seed, variant): train (unless base) and evaluate; runs in a worker process."""
    import torch

    from score_fast.demo import task as demo_task
    from score_fast.evaluation import evaluate_greedy, make_task
    from score_fast.rewards import make_reward_from
    from score_fast.trainer import Trainer
    variant, seed, base, data, train_rows, test_rows, run_dir, n1, n2, demo = args
    torch.set_num_threads(1)  # the demo's tiny matrices: one thread per process is fastest
    # each run's metric lines go to its metrics.jsonl; 2 workers' interleaved step lines on
    # the console would bury the per-variant summary lines
    logger = logging.getLogger("score_fast")
    level = logger.level
    logger.setLevel(logging.WARNING)
    t0 = time.perf_counter()
    config = variant_config(variant, base, data, run_dir, seed, n1, n2, **demo)
    try:
        with make_reward_from(config) as reward:
            tok = demo_task.build_tokenizer()
            if variant.rl:
                trainer = Trainer(config)
                trainer.train(progress=False)
                model = trainer.policy
            else:
                from score_fast.models import load_model
                model = load_model(base)
            out = {"variant": variant.name, "seed": seed,
                   **{split: evaluate_greedy(model, tok, make_task(rows, config, split),
                                             reward)["all"]
                      for split, rows in (("train", train_rows), ("held_out", test_rows))}}
    finally:
        logger.setLevel(level)
    out["seconds"] = time.perf_counter() - t0
    return out


def _warm(args) -> str:
    import torch

    from score_fast.demo.experiment import demo_rows, warm_up
    run_dir, seed, steps = args
    torch.set_num_threads(1)
    return warm_up(run_dir, demo_rows(), seed=seed, steps=steps, say=lambda *a: None)


def run_ablation(out: str = "runs/ablate", seeds=(0, 1, 2), quick: bool = False,
                 workers: int = 2, variants=VARIANTS, say=print) -> dict:
    """Run every variant for every seed; write results.json, table.md, ablation.png.
    quick: a smoke run (short warm-up, 2 + 2 RL steps, small batches), for CI."""
    from score_fast.demo.experiment import write_problems
    t0 = time.perf_counter()
    os.makedirs(out, exist_ok=True)
    warm_steps, n1, n2 = (60, 2, 2) if quick else (600, 60, 60)
    demo = {"prompts_per_step": 4, "samples_per_prompt": 4} if quick else {}
    data, train_rows, test_rows = write_problems(out)
    if quick:
        train_rows, test_rows = train_rows[:24], test_rows[:16]
    say(f"ablation: {len(variants)} variants x {len(seeds)} seeds, {n1} + {n2} RL steps, "
        f"{workers} worker processes -> {out}")
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    mapper = pool.map if pool else map
    try:
        bases = dict(zip(seeds, mapper(_warm, [(os.path.join(out, f"seed{s}"), s, warm_steps)
                                               for s in seeds])))
        say(f"warm-ups done ({time.perf_counter() - t0:.0f} s)")
        jobs = [(v, s, bases[s], data, train_rows, test_rows,
                 os.path.join(out, f"seed{s}", v.name.replace(" ", "_").replace("/", "")),
                 n1, n2, demo) for s in seeds for v in variants]
        results = []
        for r in mapper(_job, jobs):
            results.append(r)
            say(f"  seed {r['seed']} {r['variant']}: Acc@t1 {r['held_out']['acc_t1']:.3f} "
                f"Acc@t2 {r['held_out']['acc_t2']:.3f} (held-out), {r['seconds']:.0f} s")
    finally:
        if pool:
            pool.shutdown()
    summary = summarize(results, [v.name for v in variants])
    meta = {"seeds": list(seeds), "n1": n1, "n2": n2, "warmup_steps": warm_steps,
            "quick": quick, "seconds": round(time.perf_counter() - t0, 1)}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "results": results, "summary": summary}, f, indent=1)
    text = format_summary(summary, meta, len(train_rows), len(test_rows))
    with open(os.path.join(out, "table.md"), "w") as f:
        f.write(text + "\n")
    say(text)
    png = plot(summary, os.path.join(out, "ablation.png"))
    say(f"ablation finished in {meta['seconds']:.0f} s" + (f"; plot {png}" if png else ""))
    return {"meta": meta, "summary": summary, "results": results}


def summarize(results: list[dict], order: list[str]) -> dict:
    """{split: {variant: {metric: (mean, std)}}}, std over seeds (population; 0 for one)."""
    out: dict = {}
    for split in ("train", "held_out"):
        out[split] = {}
        for name in order:
            runs = [r[split] for r in results if r["variant"] == name]
            if not runs:
                continue
            stats = {}
            for m in METRICS:
                xs = [float(r[m]) for r in runs]
                mean = sum(xs) / len(xs)
                stats[m] = (mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / len(xs)))
            out[split][name] = stats
    return out


def format_summary(summary: dict, meta: dict, n_train: int, n_test: int) -> str:
    """Markdown tables, percentages as mean ± std over seeds."""
    parts = [f"{len(meta['seeds'])} seeds ({', '.join(map(str, meta['seeds']))}), "
             f"{meta['n1']} + {meta['n2']} RL steps per variant, greedy two-attempt "
             f"evaluation; percent, mean ± std over seeds."]
    for split, title in (("train", f"RL-train problems ({n_train})"),
                         ("held_out", f"held-out problems ({n_test}, never seen by RL; "
                                      f"the warm-up trained on all {n_train + n_test})")):
        lines = [f"\n{title}\n", "| variant | " + " | ".join(HEADERS) + " |",
                 "|---|" + "---|" * len(HEADERS)]
        for name, stats in summary[split].items():
            cells = []
            for m in METRICS:
                mean, std = stats[m]
                scale = 1 if m == "edit_ratio" else 100
                fmt = "{:+.1f} ± {:.1f}" if m == "delta" else "{:.1f} ± {:.1f}"
                if m == "edit_ratio":
                    fmt = "{:.3f} ± {:.3f}"
                cells.append(fmt.format(mean * scale, std * scale)
                             if not math.isnan(mean) else "n/a")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    return "\n".join(parts)


def plot(summary: dict, path: str) -> str | None:
    """Grouped bars of Acc@t1, Acc@t2 and Delta per variant (both splits) with std error
    bars; None (and a message) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.2), sharey=True)
    for ax, (split, title) in zip(axes, (("train", "RL-train problems"),
                                         ("held_out", "held-out problems"))):
        names = list(summary[split])
        for j, (m, label) in enumerate((("acc_t1", "Acc@t1"), ("acc_t2", "Acc@t2"),
                                        ("delta", "Delta(t1,t2)"))):
            means = [100 * summary[split][n][m][0] for n in names]
            stds = [100 * summary[split][n][m][1] for n in names]
            ax.bar([i + 0.27 * (j - 1) for i in range(len(names))], means, 0.27, yerr=stds,
                   capsize=2, label=label)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("percent")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

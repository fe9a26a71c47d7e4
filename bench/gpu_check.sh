#!/usr/bin/env bash
# The one command for a machine with an NVIDIA GPU (H100/H200 class) that has its own
# torch, triton and transformers and nothing else (no installs, no network):
#   bash bench/gpu_check.sh
# 1. builds score_fast into a private folder (the C++ extension if pybind11 and a compiler
#    are there, else the pure-Python packing path, and it says which);
# 2. runs the compile gate (bench/compile_gate.py) under the image's triton;
# 3. runs every test marked `gpu` (CUDA tensors, compiled Triton, not the interpreter);
# 4. runs every benchmark in its GPU mode (bench_memory.py: a full step per precision
#    setting, measured vs predicted memory) and prints the tables last.
# Logs, CSV rows and markdown tables go to $OUT when set, bench/results/ otherwise.
# Budget: under 8 minutes on an H100.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
out=${OUT:-$root/bench/results}
mkdir -p "$out"
export OUT=$out TRITON_INTERPRET=0 SCORE_FAST_BENCH_DEVICE=cuda PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
# PYTHONSAFEPATH: `python -m` must import the staged build below, not ./score_fast.

stage=$(mktemp -d)
if python3 -m pip install -q --no-index --no-deps --no-build-isolation --target "$stage" . \
    > "$out/gpu_build.log" 2>&1; then
  echo "build: installed into $stage"
else
  echo "build: pip install failed (see gpu_build.log); staging the sources without _C"
  cp -r score_fast "$stage/" && cp -r kernels "$stage/score_fast/kernels"
fi
export PYTHONPATH=$stage${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'PY'
import torch, triton, score_fast.packing as p
print(f"torch {torch.__version__}, triton {triton.__version__}, "
      f"device {torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}, "
      f"packing backend {p.backend()}")
PY

status=0
# the compile gate under the image's own triton: every kernel at every launch configuration
# compiled for sm_80/90a/100a (registers, spills, shared memory), before anything runs
python3 bench/compile_gate.py --report "$out/kernel_report_gpu_image.md" 2>&1 \
  | tee "$out/compile_gate.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
# --continue-on-collection-errors: the GPU image lacks CPU-only test dependencies
# (jsonargparse for the CLI tests); a module that cannot import must not stop the GPU tests
python3 -m pytest tests -m gpu -q -p no:cacheprovider -rs --continue-on-collection-errors \
  2>&1 | tee "$out/gpu_tests.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
tests_line=$(tail -n 1 "$out/gpu_tests.log")

# Every benchmark with a GPU mode; bench_rewards times host processes only (CPU pools), so
# it stays out of the 8 minutes.
benches=$(ls bench/bench_*.py | grep -v bench_rewards)
bash bench/run.sh $benches 2>&1 | tee "$out/gpu_bench.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# one full training step per precision setting: measured peak vs score_fast.memory
python3 bench/bench_memory.py --out "$out/bench_memory_gpu.md" 2>&1 | tee "$out/bench_memory.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

echo
echo "== gpu_check summary =="
echo "gpu tests: $tests_line"
grep -h '^|' "$out"/bench_*.md 2>/dev/null || echo "no benchmark tables"
exit $status

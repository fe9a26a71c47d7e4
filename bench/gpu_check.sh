#!/usr/bin/env bash
# The one command for a machine with an NVIDIA GPU (H100/H200 class) that has its own
# torch, triton and transformers and nothing else (no installs, no network):
#   bash bench/gpu_check.sh
# Phases, most important first, each under its own time limit so that one slow or hung
# phase cannot take the others' time (a lent GPU comes with ~15 minutes, start included):
#   build    score_fast into a private folder (the C++ extension if pybind11 and a compiler
#            are there, else the pure-Python packing path, and it says which)
#   tests    every test marked `gpu`: CUDA tensors, compiled Triton, not the interpreter
#            (among them: a training step synchronizes once, by CUDA's sync debug mode;
#            packed bf16 attention through torch's varlen_attn)
#   lmhead   bench_lmhead.py: the row-sweep linear_score_loss (not yet run on a GPU) against
#            eager, torch.compile and Liger, at H = 4096 and 1536
#   decode   bench/decode_gpu.py: both attempts' decode, score_fast.sampler vs SlotEngine
#            (CUDA graphs), Qwen2.5-0.5B / 1.5B shapes, batch 64 and 512, tokens/s and the
#            fraction of the bandwidth bound (not yet run on a GPU: budget ~170 s)
#   memory   bench_memory.py: two full training steps per precision setting of a
#            Qwen2-0.5B shape, measured vs predicted memory
#   losses   the other kernels' timings against eager, torch.compile and Liger
#   memory7b a 7B's widths (4 of its 28 layers) in bf16 and bf16 + LoRA
#   step, rollout   the remaining GPU benchmarks (bench_packing and bench_rewards time host
#            code: GPU_CHECK_PHASES=packing runs the first here too)
#   gate     (GPU_CHECK_GATE=1 only) the compile gate under the image's triton; it needs no
#            GPU, so it is run on the CPU machine with the image's triton version instead
# Seen on an H200 (2026-11-30): build 11 s, tests 55 s, memory ~140 s (4 fresh processes),
# losses 65 s, lmhead 46 s, memory7b 69 s, step > 90 s: about 9.5 minutes in all, one run in
# a 15-minute lease. GPU_CHECK_DEADLINE (seconds, default 570) caps the script; GPU_CHECK_PHASES
# (e.g. "tests memory") runs only the phases named. Logs and tables go to bench/results/,
# or, where $OUT is set (the device tool), into $OUT/gpu_check.tgz, refreshed after every
# phase so that a run cut short still returns what it finished.
# Liger-Kernel (the losses' third alternative) is not in the GPU image: download its wheel
# here (pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl
# liger-kernel), carry .whl, and start the command with
#   python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl &&
#   export PYTHONPATH=/tmp/site;
# 2026-11-30: liger-kernel 0.8.5 ran there with triton 3.6.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
start=$SECONDS
deadline=${GPU_CHECK_DEADLINE:-570}
phases=${GPU_CHECK_PHASES:-build tests lmhead decode memory losses memory7b step rollout}
if [ -n "${OUT:-}" ]; then res=$(mktemp -d); tgz=$OUT/gpu_check.tgz; else res=$root/bench/results; tgz=; fi
mkdir -p "$res"
export OUT=$res TRITON_INTERPRET=0 SCORE_FAST_BENCH_DEVICE=cuda PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1
# where a slow phase spends its time, in its log: a test running over 60 s dumps its stacks,
# as does a bench_memory child every 30 s
export PYTEST_ADDOPTS="-o faulthandler_timeout=60" BENCH_MEMORY_TRACE_S=30
# PYTHONSAFEPATH: `python -m` must import the staged build below, not ./score_fast.
summary=$res/gpu_check_summary.txt
: > "$summary"
status=0

pack() { [ -z "$tgz" ] || tar czf "$tgz" -C "$res" . ; }
# phase NAME LIMIT_S CMD...: run CMD under min(LIMIT_S, time left), log it, record the outcome
phase() {
  local name=$1 limit=$2 left rc t0=$SECONDS
  shift 2
  case " $phases " in *" $name "*) ;; *) return 0 ;; esac
  left=$((deadline - (SECONDS - start) - 10))
  [ "$left" -lt "$limit" ] && limit=$left
  if [ "$limit" -lt 20 ]; then
    echo "phase $name: skipped (${left}s left of the ${deadline}s deadline)" | tee -a "$summary"
    return 0
  fi
  echo "== phase $name (limit ${limit}s) =="
  timeout -k 5 "$limit" "$@" > "$res/$name.log" 2>&1
  rc=$?
  tail -n 25 "$res/$name.log"
  [ "$rc" -eq 0 ] || status=1
  local what="rc $rc"; [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && what="TIMED OUT"
  echo "phase $name: $what, $((SECONDS - t0))s" | tee -a "$summary"
  pack
}

nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version,clocks.sm,clocks.mem \
  --format=csv > "$res/gpu_info.txt" 2>&1

stage=$(mktemp -d)
phase build 120 python3 -m pip install --no-index --no-deps --no-build-isolation --target "$stage" .
if [ ! -d "$stage/score_fast" ]; then  # no build: the sources, packing without _C
  echo "build: staging the sources without _C" | tee -a "$summary"
  cp -r score_fast "$stage/" && cp -r kernels "$stage/score_fast/kernels"
fi
export PYTHONPATH=$stage${PYTHONPATH:+:$PYTHONPATH}
python3 - <<'PY' 2>&1 | tee -a "$res/gpu_info.txt"
import torch, triton, transformers, score_fast.packing as p
print(f"torch {torch.__version__}, triton {triton.__version__}, transformers "
      f"{transformers.__version__}, device "
      f"{torch.cuda.get_device_name() if torch.cuda.is_available() else 'NONE'}, "
      f"packing backend {p.backend()}")
PY

# xdist (in the image): test processes compile their kernels in parallel; Triton compiles
# serially within one process and the gpu tests are ~100 specialisations
par=$(python3 -c "import xdist" 2>/dev/null && echo "-n 8")
tmo=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
# --continue-on-collection-errors: the GPU image lacks CPU-only test dependencies
# (jsonargparse for the CLI tests); a module that cannot import must not stop the GPU tests
phase tests 180 python3 -m pytest tests -m gpu -q -p no:cacheprovider -rs $par $tmo \
  --continue-on-collection-errors
# the two phases no GPU has run yet first (2026-12-07): the row-sweep LM-head loss and the
# graph-captured decode; memory and losses were measured on the H200 (2026-11-30)
phase lmhead 150 bash bench/run.sh bench/bench_lmhead.py
phase decode 170 python3 bench/decode_gpu.py --out "$res/decode_gpu.md"
phase memory 180 python3 bench/bench_memory.py --out "$res/bench_memory_gpu.md"
phase losses 150 bash bench/run.sh bench/bench_losses.py
phase memory7b 90 python3 bench/bench_memory.py --shape qwen2.5-7b --layers 4 \
  --save-dtype bf16 --settings bf16 bf16+LoRA --out "$res/bench_memory_gpu_7b.md"
phase step 150 bash bench/run.sh bench/bench_step.py
phase rollout 60 bash bench/run.sh bench/bench_rollout.py
phase packing 40 bash bench/run.sh bench/bench_packing.py
[ "${GPU_CHECK_GATE:-0}" = 1 ] && phases="$phases gate" && phase gate 120 \
  python3 bench/compile_gate.py --report "$res/kernel_report_gpu_image.md"

echo
echo "== gpu_check summary ($((SECONDS - start))s) =="
cat "$res/gpu_info.txt"
cat "$summary"
grep -h -E "passed|failed|error" "$res/tests.log" 2>/dev/null | tail -n 3
grep -h '^|' "$res"/bench_*.md 2>/dev/null || echo "no benchmark tables"
pack
exit $status

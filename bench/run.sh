#!/usr/bin/env bash
# Run the benchmark suite (or the files/args given) and report it:
#   bash bench/run.sh                          # every benchmark in bench/
#   bash bench/run.sh bench/bench_packing.py   # one file
# CSV rows and markdown tables land in $OUT when set, bench/results/ otherwise.
set -euo pipefail
cd "$(dirname "$0")/.."
json=$(mktemp --suffix=.json)
trap 'rm -f "$json"' EXIT
python3 -m pytest "${@:-bench/}" -q -p no:cacheprovider --benchmark-only \
  --benchmark-save-data --benchmark-json="$json" --benchmark-columns=median,iqr,rounds
python3 bench/report.py "$json"

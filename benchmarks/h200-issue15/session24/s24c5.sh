#!/usr/bin/env bash
# Session 24, call 5: where a 128K decode step's time goes now (scripts/h200-decode-timeline.sh's
# steps, for full and duo 0.5 over bf16 and full over int4): the step timed without a
# profiler, then every kernel under Nsight Compute, summed per kernel and grid.
set -uo pipefail
source scripts/h200-common.sh
export DUO_KERNEL_CACHE=/tmp/duo/kc
trap pack_out EXIT
n=131072
for spec in "full bf16" "duo bf16" "full int4"; do
  set -- $spec; m=$1; kv=$2
  args="--device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --sparsity 0.5 --kv-dtype $kv --methods $m --lengths $n --max-prefill 0 --decode-tokens 5"
  timeout 60 $D bench $args > "$OUT/step-$m-$kv.txt" 2>&1
  echo "== $m $kv: bench exit $?"; grep -E "tokens: " "$OUT/step-$m-$kv.txt"
  timeout 150 ncu --clock-control none --csv --metrics gpu__time_duration.sum $D bench $args > "$OUT/ncu-$m-$kv.csv" 2> "$OUT/ncu-$m-$kv.err"
  echo "ncu exit $?"
  python3 scripts/kernel_times.py "$OUT/ncu-$m-$kv.csv" > "$OUT/kernels-$m-$kv.txt"; sed -n '/per kernel and grid/,$p' "$OUT/kernels-$m-$kv.txt" | head -24
  rm -f "$OUT/ncu-$m-$kv.csv"
done

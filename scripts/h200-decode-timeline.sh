#!/usr/bin/env bash
# Where a decode step's time goes (issue 16: a whole step within 1.15x of its floor), one call
# of the device tool from the repository root on the GPU host; carry .gpu/bin (duo.xz) and
# .gpu/patterns. For each method of env METHODS (default "full duo") and cache type of env KVS
# (default bf16), at env LENGTH tokens of synthetic KV (default 131072), Llama-3-8B with random
# weights: the step timed without a profiler (`duo bench`), then every kernel's duration under
# Nsight Compute summed per kernel and grid (scripts/kernel_times.py). The bench runs the
# warm-up's two steps on a short sequence and then five at LENGTH (two untimed, three timed).
# Everything lands in $OUT/results.tgz.
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
n=${LENGTH:-131072}
for kv in ${KVS:-bf16}; do
  for m in ${METHODS:-full duo}; do
    args="--device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --sparsity 0.5 --kv-dtype $kv --methods $m --lengths $n --max-prefill 0 --decode-tokens 5"
    timeout 60 $D bench $args > "$OUT/step-$m-$kv.txt" 2>&1
    echo "== $m $kv: bench exit $?"; grep -E "tokens: " "$OUT/step-$m-$kv.txt"
    timeout 150 ncu --clock-control none --csv --metrics gpu__time_duration.sum $D bench $args > "$OUT/ncu-$m-$kv.csv" 2> "$OUT/ncu-$m-$kv.err"
    echo "ncu exit $?"
    python3 scripts/kernel_times.py "$OUT/ncu-$m-$kv.csv" > "$OUT/kernels-$m-$kv.txt"; sed -n '/per kernel and grid/,$p' "$OUT/kernels-$m-$kv.txt" | head -30
    rm -f "$OUT/ncu-$m-$kv.csv"
  done
done

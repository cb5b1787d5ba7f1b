#!/usr/bin/env bash
# Where a whole-model 128K prefill's time goes (issue 16: full-attention prefill within 1.25x of
# its compute floor), one call of the device tool from the repository root on the GPU host;
# carry .gpu/bin (duo.xz). For each prefill chunk of env CHUNKS (default "4096 16384"):
#   1. the prefill timed without a profiler (`duo bench`, full attention, env PREFILL tokens,
#      default 131072);
#   2. the same under Nsight Compute with one counter, every kernel's duration, summed per
#      kernel and grid by scripts/kernel_times.py: the kernels' sum against the wall time is the
#      host's share (launch gaps, synchronisation), each kernel's share says what to speed up.
# Then, with env QUANT_VARIANTS (space-separated, each comma-separated NAME=VALUE settings),
# the quantised prefill kernels' parity and their timings over env QUANT_KV (default k8v4)
# caches with each variant. Everything lands in $OUT/results.tgz.
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
n=${PREFILL:-131072}
for c in ${CHUNKS:-4096 16384}; do
  timeout 120 $D bench --device cuda --random-weights llama-3-8b --methods full --lengths $n --chunk $c --decode-tokens 3 > "$OUT/prefill-chunk$c.txt" 2>&1
  echo "== chunk $c: bench exit $?"; grep -E "tokens: prefill" "$OUT/prefill-chunk$c.txt"
  timeout 240 ncu --clock-control none --csv --metrics gpu__time_duration.sum \
    $D bench --device cuda --random-weights llama-3-8b --methods full --lengths $n --chunk $c --decode-tokens 3 > "$OUT/ncu-chunk$c.csv" 2> "$OUT/ncu-chunk$c.err"
  echo "ncu exit $?"
  python3 scripts/kernel_times.py "$OUT/ncu-chunk$c.csv" > "$OUT/kernels-chunk$c.txt"; head -24 "$OUT/kernels-chunk$c.txt"
done
for v in ${QUANT_VARIANTS:-}; do
  vars=""; [ "$v" = default ] || vars=${v//,/ }
  timeout 100 env $vars $D cuda-check --only prefill --no-timings > "$OUT/quant-parity-$v.txt" 2>&1
  echo "== $v: prefill parity exit $?: $(grep -c '^ok' "$OUT/quant-parity-$v.txt") ok"; grep -E "^FAIL" "$OUT/quant-parity-$v.txt" | cut -c1-220 | head -4
  for kv in ${QUANT_KV:-k8v4}; do
    timeout 120 env $vars DUO_TIME_KV=$kv $D cuda-check --only ops --timings prefill > "$OUT/quant-timings-$kv-$v.txt" 2>&1
    echo "timings ($kv) exit $?"; grep -E "time prefill" "$OUT/quant-timings-$kv-$v.txt" | grep wgmma | sed 's/time prefill attention, Llama-3-8B layer, //'
  done
done

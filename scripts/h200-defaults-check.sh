#!/usr/bin/env bash
# The default kernels after a change of defaults (issue 16), one call of the device tool from the
# repository root on the GPU host; carry .gpu/bin (duo.xz) and .gpu/patterns:
#   1. every parity check group (`duo cuda-check --only GROUP`, no timings, one at a time: all
#      of them in one run take more than 200 s), the count of ok and failures;
#   2. the prefill timings over bf16 (full, duo 0.5 and all-streaming layers);
#   3. 128K prefills of Llama-3-8B (random weights) by full attention, duo 0.5 with the official
#      pattern and layer 0.5, each against its compute floor in a burst and sustained.
# Everything lands in $OUT/results.tgz.
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
for g in ops prefill dequant decode model; do
  timeout 200 $D cuda-check --only $g --no-timings > "$OUT/cuda-check-$g.txt" 2>&1
  echo "cuda-check $g exit $?: $(grep -c '^ok' "$OUT/cuda-check-$g.txt") ok, $(grep -c '^FAIL' "$OUT/cuda-check-$g.txt") failed"; grep "^FAIL" "$OUT/cuda-check-$g.txt" | cut -c1-220 | head
done
timeout 120 env DUO_TIME_KV=bf16 $D cuda-check --only ops --timings prefill > "$OUT/prefill-timings.txt" 2>&1
echo "timings exit $?"; grep -E "time prefill" "$OUT/prefill-timings.txt" | grep wgmma | sed 's/time prefill attention, Llama-3-8B layer, //'
timeout 200 $D bench --device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --sparsity 0.5 --methods full,duo,layer --lengths 131072 --decode-tokens 4 > "$OUT/prefill128k.txt" 2>&1
echo "bench exit $?"; grep -E "matrix products|tokens: prefill" "$OUT/prefill128k.txt"

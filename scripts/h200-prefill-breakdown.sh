#!/usr/bin/env bash
# Prefill on the H200 (issue 16), one call of the device tool from the repository root on
# the GPU host; carry .gpu/bin (duo.xz) and .gpu/patterns.
#   1. the prefill parity checks and the prefill kernels' timings on a Llama-3-8B layer
#      (full, duo 0.5, and all-streaming layers: what the streaming heads cost);
#   2. a 128K prefill of the Llama-3-8B shape for full, duo and layer;
#   3. with NCU=1, Nsight Compute's time of every kernel in a 16K prefill (what the model's
#      other kernels cost beside attention).
# Everything lands in $OUT/results.tgz.
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
timeout 70 $D cuda-check --only prefill --no-timings > $OUT/parity.txt 2>&1; echo "parity exit $?: $(grep -c '^ok' $OUT/parity.txt) ok"; grep "^FAIL" $OUT/parity.txt | cut -c1-200 | head -5
grep -q "^FAIL" $OUT/parity.txt && exit 1
timeout 120 $D cuda-check --only ops --timings prefill > $OUT/timings.txt 2>&1; echo "timings exit $?"; grep "time prefill" $OUT/timings.txt | grep -E "Bf16|stream" | sed 's/time prefill attention, Llama-3-8B layer, //'
timeout 120 $D bench --device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --methods full,duo,layer --sparsity 0.5 --lengths 131072 --decode-tokens 4 > $OUT/prefill128k.txt 2>&1; echo "128K exit $?"; grep -E "^\|" $OUT/prefill128k.txt
[ "${NCU:-0}" = 1 ] || exit 0
timeout 150 ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel $D bench --device cuda --random-weights llama-3-8b --methods full --lengths 16384 --decode-tokens 3 > $OUT/ncu-prefill16k.txt 2>&1; echo "ncu exit $?"
grep -E "^  [a-zA-Z_].*\(|gpu__time_duration.sum" $OUT/ncu-prefill16k.txt | paste - - | awk '{print $NF, $0}' | sort -rn | head -25 | cut -c1-220

#!/usr/bin/env bash
# The decode merge's rewrite (issue 16), one short call of the device tool from the repository
# root on the GPU host; carry .gpu/bin (duo.xz) and .gpu/patterns. Results are written straight
# to $OUT (no packing), so that a call cut short still brings back what it did:
#   1. the decode parity group with the compact merge (`DUO_DECODE_MERGE_COMPACT=1 duo
#      cuda-check --only decode`: every kernel, cache type, head size and split);
#   2. a whole decode step of Llama-3-8B (random weights) at 32K and 128K tokens of synthetic KV,
#      full attention, duo 0.5 with the official pattern and layer 0.5, without and with it;
#   3. the whole model's parity with it.
set -uo pipefail
D=/tmp/duo/duo; mkdir -p /tmp/duo "$OUT"
xz -dc .gpu/bin/duo.xz > $D && chmod +x $D
# The compact merge first (its parity), then the step with and without it, side by side.
export DUO_DECODE_MERGE_COMPACT=1
timeout 200 $D cuda-check --only decode --no-timings > "$OUT/decode-parity.txt" 2>&1
echo "decode parity (compact merge) exit $?: $(grep -c '^ok' "$OUT/decode-parity.txt") ok, $(grep -c '^FAIL' "$OUT/decode-parity.txt") failed"; grep "^FAIL" "$OUT/decode-parity.txt" | cut -c1-200 | head -5
for v in 0 1; do
  timeout 60 env DUO_DECODE_MERGE_COMPACT=$v $D bench --device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --sparsity 0.5 --methods full,duo,layer --lengths 32768,131072 --max-prefill 0 --decode-tokens 8 > "$OUT/step-compact$v.txt" 2>&1
  echo "bench (DUO_DECODE_MERGE_COMPACT=$v) exit $?"; grep -E "tokens: " "$OUT/step-compact$v.txt"
done
timeout 100 $D cuda-check --only model --no-timings > "$OUT/model-parity.txt" 2>&1
echo "model parity exit $?: $(grep -c '^ok' "$OUT/model-parity.txt") ok, $(grep -c '^FAIL' "$OUT/model-parity.txt") failed"

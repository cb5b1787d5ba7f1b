#!/usr/bin/env bash
# The decode merge's rewrite (issue 16), one short call of the device tool from the repository
# root on the GPU host; carry .gpu/bin (duo.xz) and .gpu/patterns. Results are written straight
# to $OUT (no packing), so that a call cut short still brings back what it did:
#   1. the decode parity group (`duo cuda-check --only decode`: every kernel, cache type, head
#      size and split, through the merge);
#   2. a whole decode step of Llama-3-8B (random weights) at 32K and 128K tokens of synthetic KV,
#      full attention and duo 0.5 with the official pattern;
#   3. the whole model's parity.
set -uo pipefail
D=/tmp/duo/duo; mkdir -p /tmp/duo "$OUT"
xz -dc .gpu/bin/duo.xz > $D && chmod +x $D
timeout 80 $D cuda-check --only decode --no-timings > "$OUT/decode-parity.txt" 2>&1
echo "decode parity exit $?: $(grep -c '^ok' "$OUT/decode-parity.txt") ok, $(grep -c '^FAIL' "$OUT/decode-parity.txt") failed"; grep "^FAIL" "$OUT/decode-parity.txt" | cut -c1-200 | head -5
timeout 60 $D bench --device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --sparsity 0.5 --methods full,duo --lengths 32768,131072 --max-prefill 0 --decode-tokens 8 > "$OUT/step.txt" 2>&1
echo "bench exit $?"; grep -E "tokens: " "$OUT/step.txt"
timeout 100 $D cuda-check --only model --no-timings > "$OUT/model-parity.txt" 2>&1
echo "model parity exit $?: $(grep -c '^ok' "$OUT/model-parity.txt") ok, $(grep -c '^FAIL' "$OUT/model-parity.txt") failed"

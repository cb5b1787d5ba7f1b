#!/usr/bin/env bash
# Session 25, call 6: the model's second third to /tmp; the whole model's parity with the bulk
# copies (DUO_DECODE_TMA=1: every cache type, continuous batching), and the Llama-3-8B-shaped
# bf16 decode step with and without them (random weights, official pattern at 0.5).
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
stash_part 2
timeout 300 env DUO_DECODE_TMA=1 $D cuda-check --only model --no-timings > "$OUT/model-parity-tma.txt" 2>&1
echo "model parity (TMA) exit $?: $(grep -c '^ok' "$OUT/model-parity-tma.txt") ok"; grep "^FAIL" "$OUT/model-parity-tma.txt" | head
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for round in 1 2; do for v in default DUO_DECODE_TMA=1; do
  vars=""; [ "$v" = default ] || vars=$v
  timeout 120 env $vars $D bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype bf16 --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072 \
    --max-prefill 0 --decode-tokens 8 > "$OUT/step-$v-$round.txt" 2>&1; echo "step $v round $round exit $?"; grep -E "^\| (full|duo|layer)" "$OUT/step-$v-$round.txt" | cut -d'|' -f2,4,7-9
done; done

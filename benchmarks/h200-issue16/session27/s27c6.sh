#!/usr/bin/env bash
# Session 27, call 6 (NOT RUN: the device time ran out while no machine could be started;
# it needs take.diff applied, as the next session's first call): blocks that take further splits (DUO_DECODE_TAKE=1: a long head's blocks
# each begin with a lead split, then take its 512-key splits from a counter, copying a split's
# first tiles while they finish the one before), against lead splits as shipped.
#   1. decode parity of the shipped kernels (their copy and partial code was reshaped for the
#      taking form): the bf16 cases;
#   2. decode timings and whole steps, taking against shipped;
#   3. decode parity with DUO_DECODE_TAKE=1 (its cases of lead and short splits take), then
#      the shipped kernels' int4 cases, as the device time left allows.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
timeout 100 $D cuda-check --only decode --no-timings --cases "paged decode attention Bf16," > "$OUT/parity.txt" 2>&1; echo "parity exit $?: $(grep -c '^ok' "$OUT/parity.txt") ok ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity.txt" | cut -c1-200 | head
for v in default DUO_DECODE_TAKE=1; do
  vars=""; [ $v = default ] || vars=$v
  timeout 60 env $vars $D cuda-check --only ops --timings decode > "$OUT/decode-${v//=/}.txt" 2>&1
  echo "== decode $v exit $? ($((SECONDS - start)) s)"; grep -E "Tensor +Bf16" "$OUT/decode-${v//=/}.txt" | grep -E " 1 x|9 x" | sed 's/time decode attention, Llama-3-8B layer, //; s/ per launch//; s/ of KV read//' | cut -c1-110
done
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for v in default DUO_DECODE_TAKE=1; do
  vars=""; [ $v = default ] || vars=$v
  f="$OUT/step-${v//=/}.txt"
  timeout 60 env $vars $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 131072,524288 \
    --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $v exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
done
DUO_DECODE_TAKE=1 timeout 90 $D cuda-check --only decode --no-timings --cases "paged decode attention Bf16," > "$OUT/parity-take.txt" 2>&1; echo "parity (take) exit $?: $(grep -c '^ok' "$OUT/parity-take.txt") ok ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity-take.txt" | cut -c1-200 | head
timeout 60 $D cuda-check --only decode --no-timings --cases "paged decode attention Int4," > "$OUT/parity-int4.txt" 2>&1; echo "parity (int4) exit $?: $(grep -c '^ok' "$OUT/parity-int4.txt") ok ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity-int4.txt" | cut -c1-200 | head

#!/usr/bin/env bash
# Session 29, call 10: duo's gemv_fused on qkv (the norm folded in) and o only, the MLP on
# cuBLAS (DUO_STEP_GEMV=3), against the default and =2, Llama-3-8B steps at 32K and 128K, two
# rounds; the whole model's parity with =3 (its first cases). Carry .gpu/bin, .gpu/patterns.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for round in 1 2; do
  for v in 0 3 2; do
    f="$OUT/step-gemv$v-$round.txt"
    DUO_STEP_GEMV=$v timeout 90 $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072 \
      --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== DUO_STEP_GEMV=$v round $round exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
  done
done
grep -h "copy bandwidth" "$OUT"/step-gemv0-1.txt | head -1
DUO_STEP_GEMV=3 timeout 200 $D cuda-check --only model --no-timings --cases "whole model GQA |whole model MHA |whole model GQA, int4 cache |continuous batching, Bf16" > "$OUT/parity-gemv3.txt" 2>&1
echo "parity DUO_STEP_GEMV=3 exit $?: $(grep -c '^ok' "$OUT/parity-gemv3.txt") ok, $(grep -c '^FAIL' "$OUT/parity-gemv3.txt") FAIL ($((SECONDS - start)) s)"; grep -E "^FAIL|^error|^Error" "$OUT/parity-gemv3.txt" | cut -c1-200 | head -5
echo "total $((SECONDS - start)) s"

#!/usr/bin/env bash
# Session 26, call 7: the fused matrix-vector step as shipped (opt-in, DUO_STEP_GEMV=1) beside
# the default (cuBLAS and the separate kernels), Llama-3-8B shape, bf16, official pattern at
# 0.5: one-row steps at 32K and 128K (two rounds), a batch of 4 at 32K; then the ops parity
# (default) and the whole model's parity with the fused step.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
start=$SECONDS
for round in 1 2; do
  for v in default DUO_STEP_GEMV=1; do
    vars=""; [ $v = default ] || vars=$v
    f="$OUT/step-${v//=/}-$round.txt"
    timeout 90 env $vars $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072 \
      --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $v round $round exit $? ($((SECONDS - start)) s)"; grep -E "^(full|duo|layer) " "$f" | sed 's/prefill synthetic KV, //; s/, KV .*//; s/ tokens: decode//'
  done
done
for v in default DUO_STEP_GEMV=1; do
  vars=""; [ $v = default ] || vars=$v
  f="$OUT/batch4-${v//=/}.txt"
  timeout 90 env $vars $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo --sparsity 0.5 --lengths 32768 --batch 4 \
    --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== batch 4 $v exit $? ($((SECONDS - start)) s)"; grep -E "^(full|duo|layer) " "$f" | sed 's/prefill synthetic KV, //; s/, KV .*//'
done
timeout 60 $D cuda-check --only ops --no-timings > "$OUT/ops.txt" 2>&1; echo "ops exit $?: $(grep -c '^ok' "$OUT/ops.txt") ok"; grep -E "^FAIL|^error" "$OUT/ops.txt" | head
DUO_STEP_GEMV=1 timeout 240 $D cuda-check --only model --no-timings > "$OUT/model-parity-fused.txt" 2>&1; echo "model parity (DUO_STEP_GEMV=1) exit $?: $(grep -c '^ok' "$OUT/model-parity-fused.txt") ok ($((SECONDS - start)) s)"; grep "^FAIL" "$OUT/model-parity-fused.txt" | head

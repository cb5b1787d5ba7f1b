#!/usr/bin/env bash
# Session 24, call 6: duo's one-row gemv for the products that keep or narrow their width (the
# attention output and the down projection, DUO_GEMV=2) against cuBLAS for every product
# (the default): the ops and whole-model parity with it, then Llama-3-8B steps both ways,
# alternated, two rounds.
set -uo pipefail
source scripts/h200-common.sh
export DUO_KERNEL_CACHE=/tmp/duo/kc
trap pack_out EXIT
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for round in 1 2; do
  for g in 0 2; do
    f="$OUT/step-gemv$g-r$round.txt"
    DUO_GEMV=$g timeout 60 $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072 \
      --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "step DUO_GEMV=$g round $round exit $?"; grep -E "^\| (full|duo|layer)" "$f" | cut -d'|' -f2,4,7,8,9
  done
done
DUO_GEMV=2 timeout 60 $D cuda-check --only ops --timings gemv > "$OUT/ops-gemv2.txt" 2>&1; echo "ops exit $?: $(grep -c '^ok' "$OUT/ops-gemv2.txt") ok, $(grep -c '^FAIL' "$OUT/ops-gemv2.txt") FAIL"; grep -E "^FAIL|time gemv|gemv" "$OUT/ops-gemv2.txt" | cut -c1-200 | head -20
DUO_GEMV=2 timeout 150 $D cuda-check --only model --no-timings > "$OUT/model-gemv2.txt" 2>&1; echo "model exit $?: $(grep -c '^ok' "$OUT/model-gemv2.txt") ok, $(grep -c '^FAIL' "$OUT/model-gemv2.txt") FAIL"; grep -E "^FAIL" "$OUT/model-gemv2.txt" | cut -c1-220

#!/usr/bin/env bash
# Session 24, call 4: the second partial launch of a mixed layer (bf16 windows beside a
# quantised cache) beside the first (DUO_WINDOW_OVERLAP=1) against after it (the default):
# parity of every windows case with the overlap, then Llama-3-8B-shaped steps both ways,
# alternated, two rounds.
set -uo pipefail
source scripts/h200-common.sh
export DUO_KERNEL_CACHE=/tmp/duo/kc
trap pack_out EXIT
DUO_WINDOW_OVERLAP=1 timeout 240 $D cuda-check --only decode,model --cases 'bf16 windows' --no-timings > "$OUT/parity-overlap.txt" 2>&1
echo "parity (overlap) exit $?: $(grep -c '^ok' "$OUT/parity-overlap.txt") ok, $(grep -c '^FAIL' "$OUT/parity-overlap.txt") FAIL"; grep -E "^FAIL" "$OUT/parity-overlap.txt" | cut -c1-200
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for round in 1 2; do
  for spec in int4+bf16 k8v4+bf16 fp8+bf16; do
    kv=${spec%%+*}
    for ov in 0 1; do
      f="$OUT/step-$spec-overlap$ov-r$round.txt"
      DUO_WINDOW_OVERLAP=$ov timeout 100 $D bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype $kv --kv-dtype-streaming bf16 --methods duo,layer --sparsity 0.5 --lengths 32768,131072 \
        --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "step $spec overlap $ov round $round exit $?"; grep -E "^\| (duo|layer)" "$f" | cut -d'|' -f2,4,7,8,9
    done
  done
done

#!/usr/bin/env bash
# Session 29, call 6: (a) the decode step asking the L2 for each product's first weights while
# the small kernel before it runs (DUO_STEP_PREFETCH MiB: 0, the default, against 8, 16, 32;
# two rounds), Llama-3-8B shape, random weights, official pattern at 0.5, 32K and 128K; the
# whole model's parity with it on (random-weight cases); (b) where the duo step's time goes at
# 32K, where duo is as slow as full attention (session 28: 5.79 against 5.76 ms): every
# kernel under Nsight Compute (scripts/h200-decode-timeline.sh). Carry .gpu/bin, .gpu/patterns.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
DUO_STEP_PREFETCH=16 timeout 200 $D cuda-check --only model --no-timings --cases "whole model GQA (|whole model MHA (|whole model GQA, int4 cache (|continuous batching, Bf16" > "$OUT/parity-prefetch16.txt" 2>&1
echo "parity prefetch 16 exit $?: $(grep -c '^ok' "$OUT/parity-prefetch16.txt") ok, $(grep -c '^FAIL' "$OUT/parity-prefetch16.txt") FAIL ($((SECONDS - start)) s)"; grep -E "^FAIL|^error|^Error" "$OUT/parity-prefetch16.txt" | cut -c1-200 | head -5
for round in 1 2; do
  for pf in 0 8 16 32; do
    f="$OUT/step-prefetch$pf-$round.txt"
    DUO_STEP_PREFETCH=$pf timeout 90 $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072 \
      --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== prefetch $pf round $round exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
  done
done
grep -h "copy bandwidth" "$OUT"/step-prefetch0-1.txt | head -1
mkdir -p "$OUT/tl"; OUT=$OUT/tl LENGTH=32768 METHODS="full duo" bash scripts/h200-decode-timeline.sh > "$OUT/timeline32k.txt" 2>&1; echo "timeline exit $? ($((SECONDS - start)) s)"
cat "$OUT/timeline32k.txt" | grep -v "^kernel cache\|^NVIDIA" | head -80
echo "total $((SECONDS - start)) s"

#!/usr/bin/env bash
# Session 25, call 3: the model's second third to /tmp; the Llama-3-8B-shaped decode step over
# fp8 (keys turned since this session) and int4 (turned since session 15), full/duo/layer at
# 32K and 128K (random weights, official pattern at 0.5), beside bf16.
set -uo pipefail
source scripts/h200-common.sh
export DUO_KERNEL_CACHE=/tmp/duo/kc
trap pack_out EXIT
stash_part 2
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for kv in fp8 bf16 int4; do
  timeout 120 $D bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype $kv --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072 \
    --max-prefill 0 --decode-tokens 8 --out "$OUT/step-$kv" > "$OUT/step-$kv.txt" 2>&1; echo "step $kv exit $?"; grep -E "^\| (full|duo|layer)" "$OUT/step-$kv.txt"
done

#!/usr/bin/env bash
# Session 24, call 2: the model's second third to /tmp; the Llama-3-8B-shaped decode step
# over k8v4 alone and with bf16 windows (random weights, official pattern at 0.5).
set -uo pipefail
source scripts/h200-common.sh
export DUO_KERNEL_CACHE=/tmp/duo/kc
trap pack_out EXIT
stash_part 2
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for spec in k8v4+bf16 k8v4 bf16; do
  kv=${spec%%+*}; st=""; [ "$spec" != "$kv" ] && st="--kv-dtype-streaming ${spec#*+}"
  timeout 120 $D bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype $kv $st --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072 \
    --max-prefill 0 --decode-tokens 8 --out "$OUT/step-$spec" > "$OUT/step-$spec.txt" 2>&1; echo "step $spec exit $?"; grep -E "^\| (full|duo|layer)" "$OUT/step-$spec.txt"
done

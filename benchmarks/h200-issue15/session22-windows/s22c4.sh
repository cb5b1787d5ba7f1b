#!/usr/bin/env bash
# Session 22, call 4 (a): the model's first third to /tmp; the final form's steps.
set -uo pipefail
mkdir -p /tmp/duo "$OUT"
export DUO_KERNEL_CACHE=/tmp/duo/kc
cp .gpu/m1/p /tmp/duo/m1
xz -dc .gpu/binonly/duo.xz > /tmp/duo/duo && chmod +x /tmp/duo/duo
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for v in "int4 bf16" "int4"; do set -- $v; extra=""; [ $# -eq 2 ] && extra="--kv-dtype-streaming $2"
  f="$OUT/step-$1${2:+-$2}.txt"
  timeout 90 /tmp/duo/duo bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype $1 $extra --sparsity 0.5 --methods duo,layer --lengths 32768,131072 --max-prefill 0 --decode-tokens 8 > "$f" 2>&1
  echo "== $v exit $?"; grep -E "tokens: |rror" "$f" | sed 's/prefill synthetic KV, //; s/, memory in use.*//'
done

#!/usr/bin/env bash
# Session 28, call 8: whole Llama-3-8B decode steps over every quantised cache with this
# session's defaults (swizzled stages, the one-pass merge), for issue 15's table. Carry
# .gpu/bin (the binary of calls 6-7) and .gpu/patterns.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for kv in fp8 int4 k8v4 int8 bf16; do
  f="$OUT/step-$kv.txt"
  timeout 60 $D bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype $kv --methods full,duo,layer --sparsity 0.5 --lengths 131072,524288 \
    --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $kv exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
done
echo "total $((SECONDS - start)) s"

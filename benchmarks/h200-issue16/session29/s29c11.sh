#!/usr/bin/env bash
# Session 29, call 11 (H200 asked for: the work needs more than an H100's 78 GiB): issue 15's
# longest contexts re-run with HEAD's kernels (int4: duo 0.5 at 6,200,000 tokens, 100.5 GiB of
# KV; full attention at 3,100,000), and Llama-3-8B steps at 128K and 512K (full 512K holds
# 64 GiB of KV beside 15 GiB of weights) with the default and DUO_STEP_GEMV=3.
# Carry .gpu/bin, .gpu/patterns.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for spec in "int4 duo 6200000" "int4 full 3100000"; do
  set -- $spec
  timeout 100 $D bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype $1 --methods $2 --sparsity 0.5 --sink 64 --recent 256 --lengths $3 --max-prefill 0 --decode-tokens 4 \
    > "$OUT/longest-$1-$2.txt" 2>&1; echo "== longest $spec exit $? ($((SECONDS - start)) s)"; grep -E "^(full|duo|layer) |does not fit|rror" "$OUT/longest-$1-$2.txt" | cut -c1-250
done
for v in 0 3; do
  f="$OUT/step-gemv$v.txt"
  DUO_STEP_GEMV=$v timeout 90 $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 131072,524288 \
    --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== DUO_STEP_GEMV=$v exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
done
grep -h "copy bandwidth" "$OUT"/step-gemv0.txt | head -1
echo "total $((SECONDS - start)) s"

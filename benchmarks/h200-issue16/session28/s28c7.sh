#!/usr/bin/env bash
# Session 28, call 7: decode parity of every case with the one-pass merge (and the swizzled
# stages), the default now; Llama-2-7B's steps (MHA: 32 heads a merge) with it and without.
# Carry .gpu/bin (its kernel cache holds the forms call 6 compiled on the host) and
# .gpu/patterns.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
P=.gpu/patterns/Llama-2-7B-32K-Instruct
for v in 1 0; do
  f="$OUT/step-llama-2-7b-onepass$v.txt"
  DUO_DECODE_MERGE_ONEPASS=$v timeout 60 $D bench --device cuda --random-weights llama-2-7b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072 \
    --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== llama-2-7b onepass $v exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
done
timeout 420 $D cuda-check --only decode --no-timings > "$OUT/parity-decode.txt" 2>&1; echo "parity decode exit $?: $(grep -c '^ok' "$OUT/parity-decode.txt") ok, $(grep -c '^FAIL' "$OUT/parity-decode.txt") FAIL ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity-decode.txt" | cut -c1-220 | head -8
echo "total $((SECONDS - start)) s"

#!/usr/bin/env bash
# Session 27, call 5: the lead splits' share and short splits' keys around the shipped 90% and
# 512 keys, on the one step that is within 2% of 1.15x of its floor (Llama-3-8B full at 128K),
# and duo and layer at 128K, three rounds each, in turn.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for round in 1 2 3; do
  for v in default DUO_DECODE_LEAD=0 DUO_DECODE_LEAD=95 DUO_DECODE_TAIL=256 DUO_DECODE_TAIL=384 DUO_DECODE_LEAD=85 DUO_DECODE_TAIL=768; do
    vars=""; [ $v = default ] || vars=$v
    f="$OUT/step-${v//=/}-$round.txt"
    timeout 60 env $vars $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 131072 \
      --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $v round $round exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
  done
done

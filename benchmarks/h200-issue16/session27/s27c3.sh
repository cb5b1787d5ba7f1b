#!/usr/bin/env bash
# Session 27, call 3: lead and short splits with three blocks a multiprocessor (two stages
# each), so that a short split's block waiting for its first tile leaves two streaming beside
# it (call 2: with two, the short splits' 3.7 us to their first tile ate what the balance
# gained); decode timings (bf16 rows), then whole steps.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
for v in DUO_DECODE_LEAD=0 DUO_DECODE_MIN_BLOCKS=3,DUO_DECODE_STAGES=2 DUO_DECODE_MIN_BLOCKS=3,DUO_DECODE_STAGES=2,DUO_DECODE_LEAD=80 DUO_DECODE_MIN_BLOCKS=3,DUO_DECODE_STAGES=2,DUO_DECODE_LEAD=90 DUO_DECODE_LEAD=90,DUO_DECODE_TAIL=256 DUO_DECODE_LEAD=95; do
  timeout 60 env ${v//,/ } $D cuda-check --only ops --timings decode > "$OUT/decode-$v.txt" 2>&1
  echo "== $v exit $? ($((SECONDS - start)) s)"; grep -E "Tensor +Bf16" "$OUT/decode-$v.txt" | grep -E " 1 x|9 x" | sed 's/time decode attention, Llama-3-8B layer, //; s/ per launch//; s/ of KV read//' | cut -c1-110
done
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for v in DUO_DECODE_LEAD=0 DUO_DECODE_LEAD=90 DUO_DECODE_MIN_BLOCKS=3,DUO_DECODE_STAGES=2,DUO_DECODE_LEAD=80 DUO_DECODE_LEAD=0; do
  f="$OUT/step-$v-$SECONDS.txt"
  timeout 90 env ${v//,/ } $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072,524288 \
    --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $v exit $? ($((SECONDS - start)) s)"; grep -E "^(full|duo|layer) " "$f" | sed 's/prefill synthetic KV, //; s/, KV .*//; s/ tokens: decode//'
done

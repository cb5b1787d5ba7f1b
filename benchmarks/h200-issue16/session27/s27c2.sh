#!/usr/bin/env bash
# Session 27, call 2: one-row decode launches in lead splits then short ones
# (DUO_DECODE_LEAD = the lead splits' share of a block's fair share, percent; DUO_DECODE_TAIL =
# the short splits' keys), against today's uniform splits (LEAD 0), after call 1's trace found
# 24 of the 132 multiprocessors streaming 25-30% faster than the rest:
#   1. the decode kernels' timings per setting (bf16 rows shown);
#   2. whole decode steps (Llama-3-8B shape, bf16, official pattern at 0.5) with and without;
#   3. the trace with lead splits; 4. decode parity (its new cases of lead and short splits),
#   then the whole model's parity with lead splits.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
for v in DUO_DECODE_LEAD=0 DUO_DECODE_LEAD=80 DUO_DECODE_LEAD=70 DUO_DECODE_LEAD=90 DUO_DECODE_LEAD=80,DUO_DECODE_TAIL=256 DUO_DECODE_LEAD=80,DUO_DECODE_TAIL=1024; do
  timeout 60 env ${v//,/ } $D cuda-check --only ops --timings decode > "$OUT/decode-$v.txt" 2>&1
  echo "== $v exit $? ($((SECONDS - start)) s)"; grep -E "Tensor +Bf16" "$OUT/decode-$v.txt" | sed 's/time decode attention, Llama-3-8B layer, //; s/ per launch//; s/ of KV read//' | cut -c1-110
done
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for round in 1 2; do
  for v in DUO_DECODE_LEAD=0 DUO_DECODE_LEAD=80; do
    f="$OUT/step-$v-$round.txt"
    timeout 90 env $v $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072,524288 \
      --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $v round $round exit $? ($((SECONDS - start)) s)"; grep -E "^(full|duo|layer) " "$f" | sed 's/prefill synthetic KV, //; s/, KV .*//; s/ tokens: decode//'
  done
done
DUO_DECODE_LEAD=80 DUO_DECODE_TRACE=1 timeout 60 $D cuda-check --only ops --timings decode > "$OUT/decode-trace-lead80.txt" 2>&1; echo "trace exit $? ($((SECONDS - start)) s)"
timeout 280 $D cuda-check --only decode --no-timings > "$OUT/decode-parity.txt" 2>&1; echo "decode parity exit $?: $(grep -c '^ok' "$OUT/decode-parity.txt") ok ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/decode-parity.txt" | cut -c1-220 | head
[ $((SECONDS - start)) -gt 420 ] && exit 0
DUO_DECODE_LEAD=80 timeout $((575 - SECONDS + start)) $D cuda-check --only model --no-timings > "$OUT/model-parity-lead80.txt" 2>&1; echo "model parity (lead 80) exit $?: $(grep -c '^ok' "$OUT/model-parity-lead80.txt") ok ($((SECONDS - start)) s)"; grep "^FAIL" "$OUT/model-parity-lead80.txt" | head

#!/usr/bin/env bash
# Session 27, call 6 (NOT RUN in session 27: the device time ran out while no machine could
# be started). Ready for the next session's first call: carry .gpu/bin (duo.xz, the shipped
# build; duo-take.xz, the same tree with take.diff applied; kc.tar.xz, both builds' kernels)
# and .gpu/patterns. Blocks that take further splits (DUO_DECODE_TAKE=1 in the duo-take
# build: a long head's blocks each begin with a lead split, then take its 512-key splits from
# a counter, copying a split's first tiles while they finish the one before), against lead
# splits as shipped.
#   1. decode parity of the duo-take build's kernels without TAKE (take.diff reshapes the
#      shipped kernel's copies): the bf16 cases;
#   2. decode timings and whole steps, taking against shipped;
#   3. decode parity with DUO_DECODE_TAKE=1 (its cases of lead and short splits take), then
#      the duo-take build's int4 cases, as the device time left allows.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
DT=/tmp/duo/duo-take
start=$SECONDS
timeout 100 $DT cuda-check --only decode --no-timings --cases "paged decode attention Bf16," > "$OUT/parity.txt" 2>&1; echo "parity (duo-take, no TAKE) exit $?: $(grep -c '^ok' "$OUT/parity.txt") ok ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity.txt" | cut -c1-200 | head
for v in shipped take; do
  if [ $v = shipped ]; then run="$D"; else run="env DUO_DECODE_TAKE=1 $DT"; fi
  timeout 60 $run cuda-check --only ops --timings decode > "$OUT/decode-$v.txt" 2>&1
  echo "== decode $v exit $? ($((SECONDS - start)) s)"; grep -E "Tensor +Bf16" "$OUT/decode-$v.txt" | grep -E " 1 x|9 x" | sed 's/time decode attention, Llama-3-8B layer, //; s/ per launch//; s/ of KV read//' | cut -c1-110
done
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for v in shipped take; do
  if [ $v = shipped ]; then run="$D"; else run="env DUO_DECODE_TAKE=1 $DT"; fi
  f="$OUT/step-$v.txt"
  timeout 60 $run bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 131072,524288 \
    --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $v exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
done
# Taking where blocks are short too (a duo layer's four long heads from about 66K tokens).
f="$OUT/step-take-leadmin1024.txt"
timeout 60 env DUO_DECODE_TAKE=1 DUO_DECODE_LEAD_MIN=1024 $DT bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072 \
  --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== take, lead min 1024 exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
DUO_DECODE_TAKE=1 timeout 90 $DT cuda-check --only decode --no-timings --cases "paged decode attention Bf16," > "$OUT/parity-take.txt" 2>&1; echo "parity (take) exit $?: $(grep -c '^ok' "$OUT/parity-take.txt") ok ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity-take.txt" | cut -c1-200 | head
timeout 60 $DT cuda-check --only decode --no-timings --cases "paged decode attention Int4," > "$OUT/parity-int4.txt" 2>&1; echo "parity (duo-take, int4) exit $?: $(grep -c '^ok' "$OUT/parity-int4.txt") ok ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity-int4.txt" | cut -c1-200 | head

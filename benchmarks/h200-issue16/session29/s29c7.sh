#!/usr/bin/env bash
# Session 29, call 7: call 6's weight prefetch made every step slower (1.6-2.5 ms at 8-32 MiB,
# one block of 128 threads a launch). Here: the second stream's fork and join alone (16 KiB,
# one prefetch), and the prefetches spread one a block over the multiprocessors
# (DUO_PREFETCH_THREADS=1) at 4, 8 and 16 MiB, beside call 6's layout; two rounds.
# Carry .gpu/bin, .gpu/patterns.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for round in 1 2; do
  for cfg in "0 1 64" "16 1 64" "4096 1 64" "8192 1 64" "16384 1 128" "8192 128 64"; do
    set -- $cfg
    f="$OUT/step-pf$1-t$2-c$3-$round.txt"
    DUO_STEP_PREFETCH=$1 DUO_PREFETCH_THREADS=$2 DUO_PREFETCH_CHUNK=$3 timeout 90 $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo --sparsity 0.5 --lengths 32768,131072 \
      --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== prefetch $1 KiB, $2 threads a block, chunks of $3 KiB, round $round exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
  done
done
grep -h "copy bandwidth" "$OUT"/step-pf0-*-1.txt | head -1
echo "total $((SECONDS - start)) s"

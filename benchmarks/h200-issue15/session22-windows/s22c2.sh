#!/usr/bin/env bash
# Session 22, call 2: --kv-dtype-streaming bf16 on the GPU (parity, then steps).
set -uo pipefail
mkdir -p /tmp/duo "$OUT"
export DUO_KERNEL_CACHE=/tmp/duo/kc
for b in duo prev; do xz -dc .gpu/bin/$b.xz > /tmp/duo/$b && chmod +x /tmp/duo/$b; done
D=/tmp/duo/duo
timeout 220 $D cuda-check --only decode --no-timings > "$OUT/decode-parity.txt" 2>&1
echo "decode parity exit $?: $(grep -c '^ok' "$OUT/decode-parity.txt") ok, $(grep -c '^FAIL' "$OUT/decode-parity.txt") failed"; grep "^FAIL" "$OUT/decode-parity.txt" | cut -c1-250 | head -8
timeout 200 $D cuda-check --only model --no-timings > "$OUT/model-parity.txt" 2>&1
echo "model parity exit $?: $(grep -c '^ok' "$OUT/model-parity.txt") ok, $(grep -c '^FAIL' "$OUT/model-parity.txt") failed"; grep -E "^FAIL|windows" "$OUT/model-parity.txt" | cut -c1-300 | head -8
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for v in "prev int4" "duo int4" "duo int4 bf16"; do set -- $v; extra=""; [ $# -eq 3 ] && extra="--kv-dtype-streaming $3"
  f="$OUT/step-$1-$2${3:+-$3}.txt"
  timeout 90 /tmp/duo/$1 bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype $2 $extra --sparsity 0.5 --methods full,duo,layer --lengths 32768,131072 --max-prefill 0 --decode-tokens 8 > "$f" 2>&1
  echo "== $v exit $?"; grep -E "tokens: |rror" "$f" | sed 's/prefill synthetic KV, //; s/, memory in use.*//'
done
for v in "duo int4" "duo int4 bf16"; do set -- $v; extra=""; [ $# -eq 3 ] && extra="--kv-dtype-streaming $3"
  f="$OUT/prefill-$2${3:+-$3}.txt"
  timeout 90 /tmp/duo/$1 bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype $2 $extra --sparsity 0.5 --methods duo,layer --lengths 16384 --decode-tokens 8 > "$f" 2>&1
  echo "== prefill $v exit $?"; grep -E "tokens: |rror" "$f" | sed 's/, memory in use.*//'
done
timeout 150 $D cuda-check --only prefill --no-timings > "$OUT/prefill-parity.txt" 2>&1
echo "prefill parity exit $?: $(grep -c '^ok' "$OUT/prefill-parity.txt") ok, $(grep -c '^FAIL' "$OUT/prefill-parity.txt") failed"; grep "^FAIL" "$OUT/prefill-parity.txt" | cut -c1-200 | head -5

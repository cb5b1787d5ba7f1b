#!/usr/bin/env bash
# Session 22, call 3: bf16 windows with one RoPE launch and the side stream (parity, steps).
set -uo pipefail
mkdir -p /tmp/duo "$OUT"
export DUO_KERNEL_CACHE=/tmp/duo/kc
xz -dc .gpu/bin/duo.xz > /tmp/duo/duo && chmod +x /tmp/duo/duo
D=/tmp/duo/duo
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
step() { f="$OUT/step-$1${2:+-$2}.txt"; extra=""; [ -n "${2:-}" ] && extra="--kv-dtype-streaming $2"
  timeout 90 $D bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype $1 $extra --sparsity 0.5 --methods full,duo,layer --lengths 32768,131072 --max-prefill 0 --decode-tokens 8 > "$f" 2>&1
  echo "== $1 ${2:-} exit $?"; grep -E "tokens: |rror" "$f" | sed 's/prefill synthetic KV, //; s/, memory in use.*//'; }
step int4 bf16; step int4; step fp8 bf16; step fp8
timeout 60 $D cuda-check --only ops --no-timings > "$OUT/ops-parity.txt" 2>&1
echo "ops parity exit $?: $(grep -c '^ok' "$OUT/ops-parity.txt") ok, $(grep -c '^FAIL' "$OUT/ops-parity.txt") failed"; grep "^FAIL" "$OUT/ops-parity.txt" | cut -c1-250 | head -5
timeout 200 $D cuda-check --only model --no-timings > "$OUT/model-parity.txt" 2>&1
echo "model parity exit $?: $(grep -c '^ok' "$OUT/model-parity.txt") ok, $(grep -c '^FAIL' "$OUT/model-parity.txt") failed"; grep -E "^FAIL|windows" "$OUT/model-parity.txt" | cut -c1-200 | head -8
timeout 220 $D cuda-check --only decode --no-timings > "$OUT/decode-parity.txt" 2>&1
echo "decode parity exit $?: $(grep -c '^ok' "$OUT/decode-parity.txt") ok, $(grep -c '^FAIL' "$OUT/decode-parity.txt") failed"; grep "^FAIL" "$OUT/decode-parity.txt" | cut -c1-250 | head -8

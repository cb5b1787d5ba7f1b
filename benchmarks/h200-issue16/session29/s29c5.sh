#!/usr/bin/env bash
# Session 29, call 5: what a decode-attention launch costs beside its bytes, duo's and
# PyTorch's SDPA (cuDNN) in the same call. One row over 2K-256K tokens of a full Llama-3-8B
# layer (time against bytes: the slope is the streaming rate, the intercept the fixed part),
# and at equal bytes: the full layer over 65,536 tokens and the four retrieval KV heads of the
# duo 0.5 layer alone (16 query heads) at 131,072, beside the duo 0.5 layer. bf16, fp8, int4.
# DUO_TIME_PARTIAL_ONLY=1: the partial kernel without the merge. Carry .gpu/bin.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
for round in 1 2; do
  timeout 120 python3 scripts/torch_decode_attention.py --bytes --out "$OUT/torch-bytes-$round.json" > "$OUT/torch-bytes-$round.txt" 2>&1
  echo "== torch round $round exit $? ($((SECONDS - start)) s)"; cat "$OUT/torch-bytes-$round.txt" | sed 's/torch sdpa decode attention, Llama-3-8B //'
  f="$OUT/duo-bytes-$round.txt"
  timeout 120 $D cuda-check --only ops --timings bytes > "$f" 2>&1
  echo "== duo round $round exit $? ($((SECONDS - start)) s); ops parity $(grep -c '^ok' "$f") ok, $(grep -c '^FAIL' "$f") FAIL"
  grep -E "^copy|^time decode attention bytes" "$f" | sed 's/time decode attention bytes, Llama-3-8B //; s/ per launch//; s/ of KV read//'
done
f="$OUT/duo-bytes-partial.txt"
DUO_TIME_PARTIAL_ONLY=1 timeout 120 $D cuda-check --only ops --timings bytes > "$f" 2>&1
echo "== duo partial only exit $? ($((SECONDS - start)) s)"
grep -E "^time decode attention bytes" "$f" | sed 's/time decode attention bytes, Llama-3-8B //; s/ per launch//; s/ of KV read//'
echo "total $((SECONDS - start)) s"

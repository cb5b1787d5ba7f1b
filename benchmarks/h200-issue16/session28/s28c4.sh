#!/usr/bin/env bash
# Session 28, call 4: swizzled stages for bf16 and for quantised rows of 128 bytes (fp8, int8,
# K8V4), the new default, against the padded rows (DUO_DECODE_SWIZZLE=0), one binary, the
# same call, PyTorch's SDPA first. Carry .gpu/bin and .gpu/patterns.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT

start=$SECONDS
timeout 120 python3 scripts/torch_decode_attention.py --out "$OUT/decode-attention-torch.json" > "$OUT/decode-attention-torch.txt" 2>&1; echo "torch exit $? ($((SECONDS - start)) s)"; tail -8 "$OUT/decode-attention-torch.txt"
for v in 1 0 1; do
  f="$OUT/decode-swizzle$v-$SECONDS.txt"
  DUO_DECODE_SWIZZLE=$v timeout 90 $D cuda-check --only ops --timings decode > "$f" 2>&1
  echo "== decode swizzle $v exit $? ($((SECONDS - start)) s)"; grep -E "Tensor" "$f" | grep -E " 1 x 131072| 9 x 131072| 1 x 524288" | sed 's/time decode attention, Llama-3-8B layer, //; s/ per launch//; s/ of KV read//' | cut -c1-110
done
for shape in llama-3-8b llama-2-7b; do
  case $shape in
    llama-2-7b) P=.gpu/patterns/Llama-2-7B-32K-Instruct; kvs="bf16" ;;
    *) P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k; kvs="bf16 fp8 int4 bf16" ;;
  esac
  for kv in $kvs; do
    for v in 1 0; do
      f="$OUT/step-$shape-$kv-swizzle$v-$SECONDS.txt"
      DUO_DECODE_SWIZZLE=$v timeout 60 $D bench --device cuda --random-weights $shape --pattern $P --kv-dtype $kv --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072,524288 \
        --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $shape $kv swizzle $v exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
    done
  done
done
echo "total $((SECONDS - start)) s"

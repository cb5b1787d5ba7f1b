#!/usr/bin/env bash
# Session 27, call 4: lead splits as shipped (90% of a block's fair share where that share is
# at least 3,072 keys, then 512-key splits) against uniform splits (DUO_DECODE_LEAD=0): whole
# decode steps, Llama-3-8B (official pattern at 0.5) two rounds, Llama-2-7B once; then the
# decode kernels' timings as shipped.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
for shape in llama-3-8b llama-2-7b; do
  case $shape in
    llama-2-7b) P=.gpu/patterns/Llama-2-7B-32K-Instruct; rounds="1" ;;
    *) P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k; rounds="1 2" ;;
  esac
  for round in $rounds; do
    for v in default DUO_DECODE_LEAD=0; do
      vars=""; [ $v = default ] || vars=$v
      f="$OUT/step-$shape-${v//=/}-$round.txt"
      timeout 90 env $vars $D bench --device cuda --random-weights $shape --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072,524288 \
        --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $shape $v round $round exit $? ($((SECONDS - start)) s)"; grep -E "^(full|duo|layer) " "$f" | sed 's/prefill synthetic KV, //; s/, KV .*//; s/ tokens: decode//'
    done
  done
done
timeout 60 $D cuda-check --only ops --timings decode > "$OUT/decode-default.txt" 2>&1; echo "decode timings exit $? ($((SECONDS - start)) s)"; grep -E "Tensor +Bf16" "$OUT/decode-default.txt" | sed 's/time decode attention, Llama-3-8B layer, //; s/ per launch//; s/ of KV read//' | cut -c1-110

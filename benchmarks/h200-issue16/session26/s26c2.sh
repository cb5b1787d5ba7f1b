#!/usr/bin/env bash
# Session 26, call 2: duo's matrix-vector kernel with the step's norms and SiLU folded in
# (Gpu::gemv_fused, launched as a programmatic dependent): the decode step with it (the
# default), without it (DUO_STEP_GEMV=0: cuBLAS and the separate kernels), and with it
# launched the ordinary way (DUO_GEMV_PDL=0); Llama-3-8B shape, bf16, official pattern at 0.5.
# Then the products alone (cuBLAS beside duo's), and parity: ops, model, decode.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
start=$SECONDS
for round in 1 2; do
  for v in default DUO_STEP_GEMV=0 DUO_GEMV_PDL=0; do
    vars=""; [ $v = default ] || vars=$v
    f="$OUT/step-${v//=/}-$round.txt"
    timeout 90 env $vars $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072 \
      --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $v round $round exit $? ($((SECONDS - start)) s)"; grep -E "^(full|duo|layer) " "$f" | sed 's/prefill synthetic KV, //; s/, KV .*//'
  done
done
timeout 60 $D cuda-check --only ops --timings gemv > "$OUT/ops-gemv.txt" 2>&1; echo "ops exit $?: $(grep -c '^ok' "$OUT/ops-gemv.txt") ok"; grep -E "^FAIL|time linear" "$OUT/ops-gemv.txt" | head -20
timeout 200 $D cuda-check --only model --no-timings > "$OUT/model-parity.txt" 2>&1; echo "model parity exit $?: $(grep -c '^ok' "$OUT/model-parity.txt") ok ($((SECONDS - start)) s)"; grep "^FAIL" "$OUT/model-parity.txt" | head
[ $((SECONDS - start)) -gt 420 ] && exit 0
timeout $((560 - SECONDS + start)) $D cuda-check --only decode --no-timings > "$OUT/decode-parity.txt" 2>&1; echo "decode parity exit $?: $(grep -c '^ok' "$OUT/decode-parity.txt") ok ($((SECONDS - start)) s)"; grep "^FAIL" "$OUT/decode-parity.txt" | head

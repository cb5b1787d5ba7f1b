#!/usr/bin/env bash
# Session 26, call 4: Gpu::gemv_fused rewritten around per-warp cp.async rings in shared
# memory (GEMV_STAGES items of 32 x GEMV_UNROLL 16-byte chunks, no registers held by bytes in
# flight), against cuBLAS and the separate kernels (DUO_STEP_GEMV=0): 128K decode steps
# (Llama-3-8B shape, bf16, official pattern at 0.5) per ring shape, the products alone and
# the ops parity; the whole model's parity with the default shape.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
start=$SECONDS
for v in default DUO_STEP_GEMV=0 DUO_GEMV_STAGES=4,DUO_GEMV_BLOCKS=3 DUO_GEMV_UNROLL=2,DUO_GEMV_STAGES=12 DUO_GEMV_UNROLL=2,DUO_GEMV_STAGES=8,DUO_GEMV_BLOCKS=3 DUO_GEMV_PDL=0 default DUO_STEP_GEMV=0; do
  vars=""; [ $v = default ] || vars=${v//,/ }
  f="$OUT/step-${v//[=,]/}.txt"
  timeout 90 env $vars $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 131072 \
    --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $v exit $? ($((SECONDS - start)) s)"; grep -E "^(full|duo|layer) " "$f" | sed 's/prefill synthetic KV, //; s/, KV .*//; s/ tokens: decode//'
done
for v in default DUO_GEMV_STAGES=4,DUO_GEMV_BLOCKS=3; do
  vars=""; [ $v = default ] || vars=${v//,/ }
  timeout 90 env $vars $D cuda-check --only ops --timings gemv > "$OUT/ops-${v//[=,]/}.txt" 2>&1; echo "== ops $v exit $?: $(grep -c '^ok' "$OUT/ops-${v//[=,]/}.txt") ok ($((SECONDS - start)) s)"; grep -E "^FAIL|^error|time linear" "$OUT/ops-${v//[=,]/}.txt" | sed 's/time linear, Llama-3-8B //' | head -12
done
timeout 200 $D cuda-check --only model --no-timings > "$OUT/model-parity.txt" 2>&1; echo "model parity exit $?: $(grep -c '^ok' "$OUT/model-parity.txt") ok ($((SECONDS - start)) s)"; grep "^FAIL" "$OUT/model-parity.txt" | head

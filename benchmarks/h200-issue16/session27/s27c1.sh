#!/usr/bin/env bash
# Session 27, call 1: what session 26 built after its device time, first on a GPU.
#   1. the ops parity group with the new cases (warps moving on to further output rows, the
#      SiLU-input mode, staged multi-row input) and the new `--timings gemv` rows;
#   2. one-row decode steps (Llama-3-8B shape, bf16, official pattern at 0.5, 32K and 128K, two
#      rounds): the default (cuBLAS), DUO_STEP_GEMV=1 (all four products fused) and
#      DUO_STEP_GEMV=2 (qkv, o, down fused; gate/up cuBLAS; SiLU folded into down's input);
#      Llama-2-7B shape once each;
#   3. the whole model's parity with DUO_STEP_GEMV=2, then with =1 where time is left.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
timeout 90 $D cuda-check --only ops --timings gemv > "$OUT/ops-gemv.txt" 2>&1; echo "ops exit $?: $(grep -c '^ok' "$OUT/ops-gemv.txt") ok ($((SECONDS - start)) s)"; grep -E "^FAIL|^error|time (linear|gemv|step)" "$OUT/ops-gemv.txt" | cut -c1-190 | head -40
for shape in llama-3-8b llama-2-7b; do
  case $shape in
    llama-2-7b) P=.gpu/patterns/Llama-2-7B-32K-Instruct; rounds="1" ;;
    *) P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k; rounds="1 2" ;;
  esac
  for round in $rounds; do
    for v in default DUO_STEP_GEMV=1 DUO_STEP_GEMV=2; do
      vars=""; [ $v = default ] || vars=$v
      f="$OUT/step-$shape-${v//=/}-$round.txt"
      timeout 90 env $vars $D bench --device cuda --random-weights $shape --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072 \
        --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== $shape $v round $round exit $? ($((SECONDS - start)) s)"; grep -E "^(full|duo|layer) " "$f" | sed 's/prefill synthetic KV, //; s/, KV .*//; s/ tokens: decode//'
    done
  done
done
for v in 2 1; do  # (the trace, step 4, comes after)
  [ $((SECONDS - start)) -gt 330 ] && break
  DUO_STEP_GEMV=$v timeout $((450 - SECONDS + start)) $D cuda-check --only model --no-timings > "$OUT/model-parity-gemv$v.txt" 2>&1; echo "model parity (DUO_STEP_GEMV=$v) exit $?: $(grep -c '^ok' "$OUT/model-parity-gemv$v.txt") ok ($((SECONDS - start)) s)"; grep "^FAIL" "$OUT/model-parity-gemv$v.txt" | head
done
# 4. Where one decode launch's time goes: every block's multiprocessor and instants
#    (DUO_DECODE_TRACE=1, a measurement build of the partial kernel), over the decode timings.
DUO_DECODE_TRACE=1 timeout 120 $D cuda-check --only ops --timings decode > "$OUT/decode-trace.txt" 2>&1; echo "decode trace exit $?: $(grep -c '^trace' "$OUT/decode-trace.txt") block lines ($((SECONDS - start)) s)"
grep -E "Tensor +Bf16" "$OUT/decode-trace.txt" | grep -E "1 x 131072|1 x 524288" | cut -c1-170

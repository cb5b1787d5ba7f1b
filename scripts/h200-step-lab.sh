#!/usr/bin/env bash
# The decode step against its floor (issue 16), in one call of the device tool from the
# repository root on the GPU host; carry .gpu/bin (duo.xz) and .gpu/patterns.
#   1. every parity check (`duo cuda-check --no-timings`);
#   2. the whole decode step of env SHAPE (default llama-3-8b; or llama-2-7b), env METHODS
#      (default full,duo,layer) at env SPARSITY (0.5) and LENGTHS (default 131072,524288), per
#      cache type in env STEP_KVS (default "bf16 fp8 int4"), and with each of env STEP_VARS'
#      settings (e.g. DUO_STEP_GEMV=1; comma-separated NAME=VALUE) for bf16;
#   3. the decode kernels' timings per cache type (`cuda-check --only ops --timings decode`),
#      also with each of env TIME_VARS' settings.
# Everything lands in $OUT/results.tgz.
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
timeout 300 $D cuda-check --no-timings > "$OUT/parity.txt" 2>&1
echo "parity exit $?: $(grep -c '^ok' "$OUT/parity.txt") ok"; grep "^FAIL" "$OUT/parity.txt" | head
# The model shape (env SHAPE): llama-3-8b (GQA; the official Gradient-1048k pattern at 0.5) or
# llama-2-7b (MHA; the official 32K-Instruct pattern at env SPARSITY, default 0.5).
SHAPE=${SHAPE:-llama-3-8b}
case $SHAPE in
  llama-2-7b) PATTERN=.gpu/patterns/Llama-2-7B-32K-Instruct ;;
  *) PATTERN=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k ;;
esac
step() {  # name, kv, env settings
  timeout 120 env $3 $D bench --device cuda --random-weights $SHAPE --pattern $PATTERN --kv-dtype $2 \
    --methods ${METHODS:-full,duo,layer} --sparsity ${SPARSITY:-0.5} --sink 64 --recent 256 --lengths ${LENGTHS:-131072,524288} --max-prefill 0 --decode-tokens 8 > "$OUT/step-$1.txt" 2>&1
  echo "step $1 exit $?"; grep -E "^\| (full|duo|layer)" "$OUT/step-$1.txt" | cut -d'|' -f2,4,7-9
}
for kv in ${STEP_KVS:-bf16 fp8 int4}; do step $kv $kv ""; done
for v in ${STEP_VARS:-}; do step "bf16-$v" bf16 "${v//,/ }"; done
for v in default ${TIME_VARS:-}; do
  vars=""; [ "$v" = default ] || vars=${v//,/ }
  timeout 120 env $vars $D cuda-check --only ops --timings decode > "$OUT/decode-$v.txt" 2>&1
  echo "decode timings ($v) exit $?"; grep -E "Tensor +(Bf16|Fp8|Int8|Int4)" "$OUT/decode-$v.txt" | grep -E "1 x 131072|1 x 524288|9 x 131072" | sed 's/time decode attention, Llama-3-8B layer, //'
done

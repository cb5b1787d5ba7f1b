#!/usr/bin/env bash
# Prefill attention on the H200 (issue 16), in one call of the device tool from the
# repository root on the GPU host; carry .gpu/bin (duo.xz) and .gpu/patterns.
#   1. the prefill kernels' parity (`duo cuda-check --only prefill`: mma.sync and, on Hopper,
#      wgmma on the same problems);
#   2. their timings on a Llama-3-8B layer (16K chunks after 16K and 114K cached tokens);
#   3. with MODEL=1, the whole model's parity, and a full-attention prefill of env PREFILL
#      tokens (default 131072) with the default kernel and with DUO_PREFILL_WG=0.
# Everything lands in $OUT/results.tgz.
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
timeout 200 $D cuda-check --only prefill --no-timings > "$OUT/prefill-parity.txt" 2>&1
echo "prefill parity exit $?: $(grep -c '^ok' "$OUT/prefill-parity.txt") ok"; grep -E "^FAIL|wgmma" "$OUT/prefill-parity.txt" | cut -c1-220 | head -20
timeout 200 $D cuda-check --only ops --timings prefill > "$OUT/prefill-timings.txt" 2>&1
echo "prefill timings exit $?"; grep -E "time prefill" "$OUT/prefill-timings.txt" | grep Bf16 | sed 's/time prefill attention, Llama-3-8B layer, //'
[ "${MODEL:-0}" = 1 ] || exit 0
timeout 300 $D cuda-check --only model --no-timings > "$OUT/model-parity.txt" 2>&1
echo "model parity exit $?: $(grep -c '^ok' "$OUT/model-parity.txt") ok"; grep "^FAIL" "$OUT/model-parity.txt" | head
for v in default DUO_PREFILL_WG=0; do
  vars=""; [ "$v" = default ] || vars=$v
  timeout 150 env $vars $D bench --device cuda --random-weights llama-3-8b --methods full --lengths ${PREFILL:-131072} --decode-tokens 4 > "$OUT/prefill-$v.txt" 2>&1
  echo "prefill ($v) exit $?"; grep -E "^\| full" "$OUT/prefill-$v.txt" | cut -d'|' -f2,4-9
done

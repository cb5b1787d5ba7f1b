#!/usr/bin/env bash
# Prefill attention on the H200 (issue 16), in one call of the device tool from the
# repository root on the GPU host; carry .gpu/bin (duo.xz) and .gpu/patterns.
#   1. the prefill kernels' parity (`duo cuda-check --only prefill`: mma.sync and, on Hopper,
#      wgmma on the same problems), also with each of env VARIANTS' settings;
#   2. their timings on a Llama-3-8B layer (16K chunks after 16K and 114K cached tokens);
#   0. with PROBE=1, scripts/probes/wgmma_swizzle_probe.cu compiled and run;
#   3. with MODEL=1, the whole model's parity, and a full-attention prefill of env PREFILL
#      tokens (default 131072) with the default kernel and with each of env MODEL_VARS'
#      settings (default DUO_PREFILL_WG=0, the mma.sync kernel; e.g. DUO_PREFILL_WS=1), then
#      the default kernel with each prefill chunk of env CHUNKS (e.g. "8192 16384"; duo's
#      default chunk is 4,096 tokens, PyTorch's baseline prefills in chunks of 16,384).
# Everything lands in $OUT/results.tgz.
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
# With PROBE=1 first: which descriptor fields read 128-byte-swizzled tiles (nvcc on the host).
if [ "${PROBE:-0}" = 1 ]; then
  nvcc -gencode arch=compute_90a,code=sm_90a -O2 -o /tmp/duo/swz scripts/probes/wgmma_swizzle_probe.cu > "$OUT/probe.txt" 2>&1
  for m in 0 1 2 3 4 5; do timeout 20 /tmp/duo/swz $m >> "$OUT/probe.txt" 2>&1; done
  grep "^mode" "$OUT/probe.txt"
fi
# Each variant (env VARIANTS, space-separated, each comma-separated NAME=VALUE settings, e.g.
# DUO_PREFILL_WS=2,DUO_PREFILL_WG_STAGES=4): parity, then the bf16 timings (the wgmma rows
# take the variant's form).
i=0
for v in default ${VARIANTS:-}; do
  i=$((i + 1)); vars=""; [ "$v" = default ] || vars=${v//,/ }
  timeout 100 env $vars $D cuda-check --only prefill --no-timings > "$OUT/prefill-parity-$i.txt" 2>&1
  echo "== $v: prefill parity exit $?: $(grep -c '^ok' "$OUT/prefill-parity-$i.txt") ok"; grep -E "^FAIL" "$OUT/prefill-parity-$i.txt" | cut -c1-220 | head -8
  timeout 200 env $vars $D cuda-check --only ops --timings prefill > "$OUT/prefill-timings-$i.txt" 2>&1
  echo "prefill timings exit $?"; grep -E "time prefill" "$OUT/prefill-timings-$i.txt" | grep Bf16 | sed 's/time prefill attention, Llama-3-8B layer, //'
done
[ "${MODEL:-0}" = 1 ] || exit 0
timeout 300 $D cuda-check --only model --no-timings > "$OUT/model-parity.txt" 2>&1
echo "model parity exit $?: $(grep -c '^ok' "$OUT/model-parity.txt") ok"; grep "^FAIL" "$OUT/model-parity.txt" | head
for v in default ${MODEL_VARS-DUO_PREFILL_WG=0}; do
  vars=""; [ "$v" = default ] || vars=${v//,/ }
  timeout 150 env $vars $D bench --device cuda --random-weights llama-3-8b --methods full --lengths ${PREFILL:-131072} --decode-tokens 4 > "$OUT/prefill-$v.txt" 2>&1
  echo "prefill ($v) exit $?"; grep -E "^\| full" "$OUT/prefill-$v.txt" | cut -d'|' -f2,4-9
done
for c in ${CHUNKS:-}; do
  timeout 150 $D bench --device cuda --random-weights llama-3-8b --methods full --lengths ${PREFILL:-131072} --chunk $c --decode-tokens 4 > "$OUT/prefill-chunk$c.txt" 2>&1
  echo "prefill (chunk $c) exit $?"; grep -E "^\| full" "$OUT/prefill-chunk$c.txt" | cut -d'|' -f2,4-5,12-13
done

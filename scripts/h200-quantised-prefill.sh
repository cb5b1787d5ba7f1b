#!/usr/bin/env bash
# Prefill attention over quantised caches on the H200 (issues 15 and 16), one call of the
# device tool from the repository root on the GPU host; carry .gpu/bin (duo.xz).
# Steps 1, 2 and 4 with the wgmma kernel over quantised caches (DUO_PREFILL_WG_QUANTISED=1).
#   1. the prefill parity checks (mma.sync and, on Hopper, wgmma over bf16 and every
#      quantised cache), stopping at a failure;
#   2. both kernels' timings on a Llama-3-8B layer for every cache type;
#   3. a full-attention prefill of 131,072 tokens over a k8v4 cache with the mma.sync kernel
#      and with the wgmma kernel (64-key tiles, then 128);
#   4. the whole model's parity with the wgmma kernel over quantised caches.
# Everything lands in $OUT/results.tgz.
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
export DUO_PREFILL_WG_QUANTISED=1
timeout 100 $D cuda-check --only prefill --no-timings > $OUT/prefill-parity.txt 2>&1
echo "prefill parity exit $?: $(grep -c '^ok' $OUT/prefill-parity.txt) ok"; grep -E "^FAIL" $OUT/prefill-parity.txt | cut -c1-200 | head
grep -q "^FAIL" $OUT/prefill-parity.txt && exit 1
timeout 120 $D cuda-check --only ops --timings prefill > $OUT/prefill-timings.txt 2>&1
echo "timings exit $?"; grep "time prefill" $OUT/prefill-timings.txt | sed 's/time prefill attention, Llama-3-8B layer, //'
for v in DUO_PREFILL_WG_QUANTISED=0 DUO_PREFILL_WG_QUANTISED=1 DUO_PREFILL_WG_QUANTISED=1,DUO_PREFILL_WG_BK=128; do
  vars=${v//,/ }
  timeout 80 env $vars $D bench --device cuda --random-weights llama-3-8b --kv-dtype k8v4 --methods full --lengths 131072 --decode-tokens 4 > $OUT/prefill-k8v4-$v.txt 2>&1
  echo "k8v4 128K ($v) exit $?"; grep -E "^\| full" $OUT/prefill-k8v4-$v.txt | cut -d'|' -f2,4-9
done
timeout 150 $D cuda-check --only model --no-timings > $OUT/model-parity.txt 2>&1
echo "model parity exit $?: $(grep -c '^ok' $OUT/model-parity.txt) ok"; grep "^FAIL" $OUT/model-parity.txt | cut -c1-250

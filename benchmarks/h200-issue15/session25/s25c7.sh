#!/usr/bin/env bash
# Session 25, call 7: the model joined from its three thirds; the passkey and needle grids with
# int8 (5 depths x 4 lengths, full/duo/layer at 0.5, shipped patterns) and the passkey at ten
# other depths: the 8-bit cache beside which fp8's turned keys are judged (session 25's bf16
# and fp8 grids came from call 4 of the same binary's kernels).
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
stash_part 3; join_three_parts
for task in passkey niah; do
  extra=""; [ $task = niah ] && extra="--haystack .gpu/niah"; [ $task = passkey ] && extra="--words 32"
  timeout 100 $D eval $task --device cuda --kv-dtype int8 --sparsity 0.5 --lengths 1000,2000,4000,8000 --depths 0.1,0.3,0.5,0.7,0.9 \
    --methods full,duo,layer $extra --out "$OUT/grid-int8-$task" > "$OUT/grid-int8-$task.txt" 2>&1; echo "int8 $task exit $?"; grep -E "^\| (full|duo|layer) " "$OUT/grid-int8-$task/summary.md" | cut -c1-200
done
timeout 110 $D eval passkey --device cuda --kv-dtype int8 --sparsity 0.5 --lengths 1000,2000,4000,8000 --depths 0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95 \
  --methods full,duo,layer --words 32 --out "$OUT/depth10-int8-passkey" > "$OUT/depth10-int8-passkey.txt" 2>&1; echo "depth10 int8 exit $?"; grep -E "^\| (full|duo|layer) " "$OUT/depth10-int8-passkey/summary.md" | cut -c1-200

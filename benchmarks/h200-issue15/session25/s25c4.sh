#!/usr/bin/env bash
# Session 25, call 4: the model joined from its three thirds; the passkey and needle grids
# (5 depths x 4 lengths, full/duo/layer at 0.5, shipped patterns) with bf16, fp8 (keys turned)
# and fp8 with bf16 windows; then the passkey at ten other depths for bf16 and fp8.
set -uo pipefail
source scripts/h200-common.sh
export DUO_KERNEL_CACHE=/tmp/duo/kc
trap pack_out EXIT
stash_part 3; join_three_parts
for spec in fp8 fp8+bf16 bf16; do
  kv=${spec%%+*}; st=""; [ "$spec" != "$kv" ] && st="--kv-dtype-streaming ${spec#*+}"
  for task in passkey niah; do
    extra=""; [ $task = niah ] && extra="--haystack .gpu/niah"; [ $task = passkey ] && extra="--words 32"
    timeout 100 $D eval $task --device cuda --kv-dtype $kv $st --sparsity 0.5 --lengths 1000,2000,4000,8000 --depths 0.1,0.3,0.5,0.7,0.9 \
      --methods full,duo,layer $extra --out "$OUT/grid-$spec-$task" > "$OUT/grid-$spec-$task.txt" 2>&1; echo "$spec $task exit $?"; grep -E "^\| (full|duo|layer) " "$OUT/grid-$spec-$task/summary.md" | cut -c1-200
  done
done
for spec in fp8 bf16; do
  timeout 110 $D eval passkey --device cuda --kv-dtype $spec --sparsity 0.5 --lengths 1000,2000,4000,8000 --depths 0.05,0.15,0.25,0.35,0.45,0.55,0.65,0.75,0.85,0.95 \
    --methods full,duo,layer --words 32 --out "$OUT/depth10-$spec-passkey" > "$OUT/depth10-$spec-passkey.txt" 2>&1; echo "depth10 $spec exit $?"; grep -E "^\| (full|duo|layer) " "$OUT/depth10-$spec-passkey/summary.md" | cut -c1-200
done

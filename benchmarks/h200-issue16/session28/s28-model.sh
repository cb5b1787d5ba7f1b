#!/usr/bin/env bash
# Session 28, not run (see s28c5.sh): the whole model's parity (SmolLM2, every cache type, continuous
# batching) with the swizzled stages. Carry .gpu/bin and .gpu/m3 (calls 4 and 5 left parts
# 1 and 2 in /tmp on the warm machine).
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
stash_part 3
join_three_parts
start=$SECONDS
timeout 450 $D cuda-check --only model --no-timings > "$OUT/parity-model.txt" 2>&1; echo "model parity exit $?: $(grep -c '^ok' "$OUT/parity-model.txt") ok, $(grep -c '^FAIL' "$OUT/parity-model.txt") FAIL ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity-model.txt" | cut -c1-220 | head -8
echo "total $((SECONDS - start)) s"

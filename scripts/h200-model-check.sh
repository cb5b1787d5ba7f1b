#!/usr/bin/env bash
# The whole model's parity on the GPU host (SmolLM2-135M through the CUDA backend: every cache
# type, continuous batching; `duo cuda-check --only model`), in as many device calls as
# scripts/gpu-prep.sh split the model into (DUO_MODEL_PARTS, 4): call i of n carries
# .gpu/bin and .gpu/mi and runs
#
#   bash scripts/h200-model-check.sh i n
#
# Calls before the last leave their part in /tmp on the warm machine; the last joins the
# parts (checking the SHA-256) and runs the check, with EXTRA_VARS (e.g. DUO_STEP_GEMV=1)
# in its environment. The calls must follow each other within the 30 s a machine stays warm.
set -uo pipefail
[ $# -eq 2 ] && [ "$1" -ge 1 ] && [ "$1" -le "$2" ] || { echo "usage: $0 PART PARTS (1 <= PART <= PARTS)" >&2; exit 2; }
source scripts/h200-common.sh
trap pack_out EXIT
stash_part "$1"
[ "$1" -lt "$2" ] && exit 0
join_parts
start=$SECONDS
timeout 450 env ${EXTRA_VARS:-} $D cuda-check --only model --no-timings > "$OUT/parity-model.txt" 2>&1
echo "model parity exit $?: $(grep -c '^ok' "$OUT/parity-model.txt") ok, $(grep -c '^FAIL' "$OUT/parity-model.txt") FAIL ($((SECONDS - start)) s)"
grep -E "^FAIL|^error" "$OUT/parity-model.txt" | cut -c1-220 | head -8

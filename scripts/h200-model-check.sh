#!/usr/bin/env bash
# The whole model's parity on the GPU host (`duo cuda-check --only model`: models of seeded
# random weights through the CUDA backend against the CPU reference, every cache type, and
# continuous batching against each sequence alone), in one device call carrying .gpu/bin:
#
#   bash scripts/h200-model-check.sh
#
# with EXTRA_VARS (e.g. DUO_STEP_GEMV=1) in the check's environment. The check reads no model
# file (until session 29 the default model was carried beside it, in parts; it is not read).
set -uo pipefail
[ $# -eq 0 ] || { echo "usage: [EXTRA_VARS=...] $0" >&2; exit 2; }
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
timeout 450 env ${EXTRA_VARS:-} $D cuda-check --only model --no-timings > "$OUT/parity-model.txt" 2>&1
echo "model parity exit $?: $(grep -c '^ok' "$OUT/parity-model.txt") ok, $(grep -c '^FAIL' "$OUT/parity-model.txt") FAIL ($((SECONDS - start)) s)"
grep -E "^FAIL|^error" "$OUT/parity-model.txt" | cut -c1-220 | head -8

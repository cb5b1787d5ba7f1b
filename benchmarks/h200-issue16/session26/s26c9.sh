#!/usr/bin/env bash
# Session 26, call 9: the ops parity group with its new RoPE + append check of split types
# (fp8 and int4 caches beside bf16 windows: retrieval keys and queries turned, streaming ones
# not) and the fused matrix-vector checks.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
timeout 90 $D cuda-check --only ops --no-timings > "$OUT/ops.txt" 2>&1; echo "ops exit $?: $(grep -c '^ok' "$OUT/ops.txt") ok"; grep -E "^FAIL|^error|rope_append" "$OUT/ops.txt" | cut -c1-200

#!/usr/bin/env bash
# Session 28, call 5: decode parity of every case with the swizzled stages (the default); the host's kernel cache brought back (the
# forms the checks compiled there). Carry .gpu/bin. (The whole model's check, scripts/h200-model-check.sh since, was
# not run: the tree, 33 MiB, and a model part no longer fit a call's 64 MiB together.)
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
timeout 420 $D cuda-check --only decode --no-timings > "$OUT/parity-decode.txt" 2>&1; echo "parity decode exit $?: $(grep -c '^ok' "$OUT/parity-decode.txt") ok, $(grep -c '^FAIL' "$OUT/parity-decode.txt") FAIL ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity-decode.txt" | cut -c1-220 | head -8
tar -C "$DUO_KERNEL_CACHE" -cf - . | xz -T8 -6 > "$OUT/kc-host.tar.xz"
echo "total $((SECONDS - start)) s"

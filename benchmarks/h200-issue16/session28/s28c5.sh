#!/usr/bin/env bash
# Session 28, call 5: decode parity of every case with the swizzled stages (the default), then
# of the bf16 and fp8 cases with the padded rows; the host's kernel cache brought back (the
# forms the checks compiled there). Carry .gpu/bin and .gpu/m2 (stashed for call 6).
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
stash_part 2
start=$SECONDS
timeout 420 $D cuda-check --only decode --no-timings > "$OUT/parity-decode.txt" 2>&1; echo "parity decode exit $?: $(grep -c '^ok' "$OUT/parity-decode.txt") ok, $(grep -c '^FAIL' "$OUT/parity-decode.txt") FAIL ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity-decode.txt" | cut -c1-220 | head -8
tar -C "$DUO_KERNEL_CACHE" -cf - . | xz -T8 -6 > "$OUT/kc-host.tar.xz"
echo "total $((SECONDS - start)) s"

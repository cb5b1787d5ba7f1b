#!/usr/bin/env bash
# Session 25, call 2: the model's first third to /tmp; every parity check (fp8 keys now in a
# Hadamard basis: RoPE + append turns queries and keys over fp8 as over int4).
set -uo pipefail
source scripts/h200-common.sh
export DUO_KERNEL_CACHE=/tmp/duo/kc
trap pack_out EXIT
stash_part 1
timeout 480 $D cuda-check --no-timings > "$OUT/parity.txt" 2>&1
echo "parity exit $?: $(grep -c '^ok' "$OUT/parity.txt") ok, $(grep -c '^FAIL' "$OUT/parity.txt") FAIL"; grep "^FAIL" "$OUT/parity.txt" | head -20; tail -3 "$OUT/parity.txt"

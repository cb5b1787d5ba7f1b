#!/usr/bin/env bash
# Session 24, call 1: the model's first third to /tmp; every parity group and the decode
# timings with the binary of HEAD (the session-23 host refactors had not run on a GPU), and
# PyTorch's SDPA decode attention beside them in the same call.
set -uo pipefail
source scripts/h200-common.sh
export DUO_KERNEL_CACHE=/tmp/duo/kc
trap pack_out EXIT
stash_part 1
timeout 420 $D cuda-check --timings decode > "$OUT/cuda-check.txt" 2>&1; echo "cuda-check exit $?: $(grep -c '^ok' "$OUT/cuda-check.txt") ok, $(grep -c '^FAIL' "$OUT/cuda-check.txt") FAIL"
grep -E "^FAIL" "$OUT/cuda-check.txt" | cut -c1-240 | head -20
grep -E "time decode" "$OUT/cuda-check.txt" | head -60
timeout 120 python3 scripts/torch_decode_attention.py --out "$OUT/decode-attention-torch.json" 2>&1 | tee "$OUT/decode-attention-torch.txt" | tail -8

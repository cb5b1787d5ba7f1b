#!/usr/bin/env bash
# Issue 16's peers on the H200, in two calls of the device tool made back to back, from the
# repository root on the GPU host. FlashAttention-4's unpacked wheels (GPU.md) travel as one
# xz tarball in two parts (together they are over one call's limit).
#   a   carry .gpu/bin (duo.xz), .gpu/fa4p1: kernel parity and timings (`duo cuda-check`),
#       PyTorch's decode attention; leaves FlashAttention-4's first part in /tmp
#   b   carry .gpu/bin, .gpu/fa4p2 (env FA4_SHA256: the whole tarball's checksum): joins
#       FlashAttention-4, runs the peers (SDPA, FlexAttention, FlashAttention-4) on the
#       Llama-3-8B layer shape, then duo's kernels on the same shapes beside them
#       (`duo bench --attention-peers`, its attention.md carries the ratios)
set -uo pipefail
step=$1
source "$(dirname "$0")/h200-common.sh"
if [ "$step" = a ]; then
  cp .gpu/fa4p1/fa4.part00 /tmp/duo/fa4.part00
  timeout 300 $D cuda-check > "$OUT/cuda-check.txt" 2>&1; echo "cuda-check exit $?: $(grep -c '^ok' "$OUT/cuda-check.txt") ok"
  grep -E "^FAIL" "$OUT/cuda-check.txt" | cut -c1-240 | head -30
  grep -E "time decode|split sweep|time prefill" "$OUT/cuda-check.txt"
  timeout 120 python3 scripts/torch_decode_attention.py --out "$OUT/decode-attention-torch.json" 2>&1 | tee "$OUT/decode-attention-torch.txt" | tail -8
elif [ "$step" = b ]; then
  cat /tmp/duo/fa4.part00 .gpu/fa4p2/fa4.part01 > /tmp/duo/fa4.tar.xz
  echo "${FA4_SHA256:?}  /tmp/duo/fa4.tar.xz" | sha256sum -c || exit 1
  mkdir -p /tmp/fa4 && tar -xJf /tmp/duo/fa4.tar.xz -C /tmp/fa4
  export PYTHONPATH=/tmp/fa4:/tmp/fa4/nvidia_cutlass_dsl/dsl_packages
  timeout 360 python3 scripts/attention_peers.py --out "$OUT/attention-peers.json" 2>&1 | tee "$OUT/attention-peers.txt" | tail -20
  timeout 200 $D bench --device cuda --random-weights llama-3-8b --methods full --lengths 32768 --max-prefill 0 --decode-tokens 4 \
    --attention-peers "$OUT/attention-peers.json" --out "$OUT/bench-attention" > "$OUT/bench-attention.txt" 2>&1
  echo "bench attention exit $?"; tail -5 "$OUT/bench-attention.txt"; cat "$OUT/bench-attention/attention.md" 2>/dev/null
fi

#!/usr/bin/env bash
# Session 29, call 8: why duo's own matrix-vector step (DUO_STEP_GEMV=2: qkv with the norm
# folded in, o, and down with the SiLU folded in, on gemv_fused; gate/up on cuBLAS), faster
# than cuBLAS on qkv and o alone (session 27), takes the same step time: every kernel of a
# full Llama-3-8B step at 128K under Nsight Compute with the default (cuBLAS) and with =2,
# and each step timed without the profiler. Carry .gpu/bin, .gpu/patterns.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
for v in 0 2; do
  mkdir -p "$OUT/gemv$v"
  DUO_STEP_GEMV=$v OUT=$OUT/gemv$v LENGTH=131072 METHODS="full duo" bash scripts/h200-decode-timeline.sh > "$OUT/timeline-gemv$v.txt" 2>&1
  echo "== DUO_STEP_GEMV=$v: timeline exit $? ($((SECONDS - start)) s)"
  grep -v "^kernel cache\|^NVIDIA\|^total\|^drwx\|^-rw" "$OUT/timeline-gemv$v.txt" | head -70
done
echo "total $((SECONDS - start)) s"

#!/usr/bin/env bash
# Session 26, call 8: duo's bf16 decode partial kernel (1 x 128K, Llama-3-8B layer) hits the L2
# on 48% of its sector requests where cuDNN's hits on 0.6% (call 1). Is it the copies'
# L2::128B prefetch hint? Nsight Compute with the hint off (DUO_DECODE_L2_PREFETCH=0) and at
# 256 bytes, and the decode timings of each.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
NCU="ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis"
for p in 0 256; do
  DUO_DECODE_L2_PREFETCH=$p timeout 90 $NCU -k duo_decode_partial_tc --launch-skip 5 --launch-count 1 $D cuda-check --only ops --timings decode > "$OUT/ncu-duo-pf$p.txt" 2>&1
  echo "== ncu prefetch $p exit $? ($((SECONDS - start)) s)"; grep -E "Duration|DRAM Throughput|L2 Cache Throughput|L2 Hit Rate" "$OUT/ncu-duo-pf$p.txt" | head -4
done
for p in 128 0 256; do
  DUO_DECODE_L2_PREFETCH=$p timeout 60 $D cuda-check --only ops --timings decode > "$OUT/decode-pf$p.txt" 2>&1
  echo "== decode prefetch $p exit $? ($((SECONDS - start)) s)"; grep -E "Tensor +Bf16" "$OUT/decode-pf$p.txt" | sed 's/time decode attention, Llama-3-8B layer, //' | head -4
done

#!/usr/bin/env bash
# Nsight Compute on the two prefill kernels (mma.sync and Hopper's wgmma), Llama-3-8B layer,
# a 16K chunk after 16K cached tokens (issue 16), from the repository root on the GPU host;
# carry .gpu/bin. Results in $OUT/results.tgz. The tensor pipes' use is the hmma-pipe
# counter, for both kernels (the gmma-pipe one read n/a on the H200, session 14).
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
# KERNELS: which of the two (default both). DUO_TIME_LAYER=full|duo|stream and
# DUO_TIME_KV=bf16|fp8|int8|int4|k8v4 pick which timed layer and cache the profiled launch is
# (default: the first, a full layer over bf16). SOURCE=1 adds the per-line counters (NVRTC
# builds with -lineinfo), to see which source lines the warps stall on.
src=""
if [ "${SOURCE:-0}" = 1 ]; then export DUO_NVRTC_LINEINFO=1; src="--section SourceCounters"; fi
for k in ${KERNELS:-duo_prefill_attention duo_prefill_attention_wg}; do
  timeout 200 ncu --clock-control none $src --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats --section Occupancy \
    --section MemoryWorkloadAnalysis --section InstructionStats --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio,sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_tensor_op_gmma.sum,lts__t_sectors_srcunit_tex_op_read.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,l1tex__data_pipe_lsu_wavefronts_mem_shared.sum,smsp__inst_executed_pipe_lsu.sum" \
    -k $k --launch-count 1 $D cuda-check --only ops --timings prefill > "$OUT/ncu-$k.txt" 2>&1
  echo "== $k (exit $?)"
  grep -E "Duration|Compute \(SM\) Throughput|Issued Warp|No Eligible|Achieved Occupancy|Registers Per|Executed Instructions  |tensor_op|Memory Throughput|L1/TEX Hit|L2 Hit" "$OUT/ncu-$k.txt" | head -16
  grep -E "stalled" "$OUT/ncu-$k.txt" | sort -k3 -g -r | head -8
  grep -E "gmma|lts__|l1tex__data|pipe_lsu" "$OUT/ncu-$k.txt"
done

#!/usr/bin/env bash
# Where a decode step's time goes (issue 16), in one call of the device tool from the
# repository root on the GPU host; carry .gpu/bin (duo.xz) and .gpu/patterns.
#   1. every kernel of the Llama-3-8B decode steps (env METHOD, default full; bf16 KV, env
#      LENGTH tokens of synthetic KV, default 131,072) timed alone by Nsight Compute (graph
#      nodes one by one): names and durations, to set against the step's time and floor that
#      `duo bench` prints (the last steps in the file are at LENGTH);
#   2. with KV_TYPES (e.g. "fp8 int4"), Nsight Compute's sections on the quantised decode
#      kernel of each cache type (full layer, 1 x 131,072 tokens): bandwidth, occupancy,
#      warp stalls; with SOURCE=1 also its per-source-line counters.
# Everything lands in $OUT/results.tgz.
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
BENCH="bench --device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --sink 64 --recent 256 --max-prefill 0 --decode-tokens 3 --lengths ${LENGTH:-131072} --methods ${METHOD:-full}"
timeout 60 $D $BENCH > "$OUT/step.txt" 2>&1; grep -E "^\| (full|duo|layer)" "$OUT/step.txt" | cut -d'|' -f2,4,7-9
# The synthetic fill's kernels are left out (1,265 of them at 128K: with them the first 2,500
# launches never reached a step at the bench's length, session 14); about 1,100 kernels then
# come before the first step at LENGTH and a step is about 390, so the default 2,400 holds
# three such steps.
timeout 300 ncu --clock-control none --graph-profiling node --metrics gpu__time_duration.sum --csv --print-units base \
  -k 'regex:^(?!fill_)' --launch-count ${LAUNCHES:-2400} $D $BENCH > "$OUT/step-kernels.csv" 2> "$OUT/step-kernels.err"
echo "ncu step exit $?: $(grep -c gpu__time_duration "$OUT/step-kernels.csv") kernels timed"
# With SOURCE=1 the kernels carry line numbers and Nsight Compute adds its per-line counters
# (where in the source the warps stall and the instructions go).
[ "${SOURCE:-0}" = 1 ] && export DUO_NVRTC_LINEINFO=1 && SRC="--section SourceCounters" || SRC=""
for kv in ${KV_TYPES:-}; do
  timeout 150 env DUO_TIME_KV=$kv ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis \
    --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats --section InstructionStats $SRC \
    --metrics "regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio" \
    -k duo_decode_partial_tc --launch-skip 5 --launch-count 1 $D cuda-check --only ops --timings decode > "$OUT/ncu-$kv.txt" 2>&1
  echo "ncu $kv exit $?"
  grep -E "DRAM Throughput|Duration|Achieved Occupancy|Registers Per|Issued Warp|No Eligible|Block Limit|Stall|Grid Size" "$OUT/ncu-$kv.txt" | head -30
  grep -E "stalled" "$OUT/ncu-$kv.txt" | sort -k3 -g -r | head -8
done

#!/usr/bin/env bash
# Session 28, call 3: bf16 stages of swizzled rows (the new default) against the padded rows
# before them (DUO_DECODE_SWIZZLE=0), one binary, the same call; and quantised caches' rows
# padded to 32 bytes (DUO_DECODE_BYTE_PAD=32) against 16. Carry .gpu/bin and .gpu/patterns.
#   1. decode parity of the bf16 cases (swizzled), then of every cache type with byte pad 32;
#   2. Nsight Compute's sector counts of both bf16 forms (1 x 128K);
#   3. decode timings of every cache type: default, SWIZZLE=0, BYTE_PAD=32;
#   4. whole Llama-3-8B steps, swizzled against padded, two rounds.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
timeout 100 $D cuda-check --only decode --no-timings --cases "paged decode attention Bf16," > "$OUT/parity-bf16.txt" 2>&1; echo "parity bf16 exit $?: $(grep -c '^ok' "$OUT/parity-bf16.txt") ok, $(grep -c '^FAIL' "$OUT/parity-bf16.txt") FAIL ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity-bf16.txt" | cut -c1-200 | head -5
M="smsp__sass_l1tex_m_xbar2l1tex_read_sectors_mem_global_op_ldgsts_cache_bypass.sum,smsp__inst_executed_op_ldgsts.sum,lts__t_sectors_srcunit_tex_op_read_lookup_hit.sum,lts__t_sectors_srcunit_tex_op_read.sum,dram__bytes_read.sum.per_second,gpu__time_duration.sum,lts__throughput.avg.pct_of_peak_sustained_elapsed,smsp__sass_l1tex_data_pipe_lsu_wavefronts_mem_shared_op_ldgsts.sum"
for v in 1 0; do
  DUO_DECODE_SWIZZLE=$v timeout 60 ncu --clock-control none --metrics $M -k duo_decode_partial_tc --launch-skip 5 --launch-count 1 $D cuda-check --only ops --timings decode > "$OUT/ncu-swizzle$v.txt" 2>&1
  echo "== ncu swizzle $v exit $? ($((SECONDS - start)) s)"; grep -E "sectors|ldgsts|hit|read.sum|per_second|duration|throughput" "$OUT/ncu-swizzle$v.txt" | tr -s ' ' | head -9
done
for v in "DUO_DECODE_SWIZZLE=1" "DUO_DECODE_SWIZZLE=0" "DUO_DECODE_BYTE_PAD=32"; do
  timeout 90 env $v $D cuda-check --only ops --timings decode > "$OUT/decode-$v.txt" 2>&1
  echo "== decode $v exit $? ($((SECONDS - start)) s)"; grep -E "Tensor" "$OUT/decode-$v.txt" | grep -E " 1 x 131072| 9 x 131072| 1 x 524288|64 x" | sed 's/time decode attention, Llama-3-8B layer, //; s/ per launch//; s/ of KV read//' | cut -c1-120
done
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for round in 1 2; do
  for v in 1 0; do
    f="$OUT/step-swizzle$v-$round.txt"
    DUO_DECODE_SWIZZLE=$v timeout 60 $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072,524288 \
      --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== step swizzle $v round $round exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
  done
done
DUO_DECODE_BYTE_PAD=32 timeout 120 $D cuda-check --only decode --no-timings > "$OUT/parity-bytepad32.txt" 2>&1; echo "parity (all, byte pad 32) exit $?: $(grep -c '^ok' "$OUT/parity-bytepad32.txt") ok, $(grep -c '^FAIL' "$OUT/parity-bytepad32.txt") FAIL ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity-bytepad32.txt" | cut -c1-200 | head -5
echo "total $((SECONDS - start)) s"

#!/usr/bin/env bash
# Where the decode-attention kernel's time goes (issue 16), in one call of the device tool
# from the repository root on the GPU host; carry .gpu/bin (duo.xz).
#   1. the decode kernels' parity (`duo cuda-check --only decode`), also with each of
#      env PARITY_VARS' settings (as VARIANTS' below);
#   2. duo's decode timings (tensor-core bf16 rows) at the shipped settings and at others:
#      env VARIANTS, space-separated variants, each comma-separated NAME=VALUE settings of
#      DUO_DECODE_STAGES, _MIN_BLOCKS, _L2_PREFETCH (0, 128: the default, 256),
#      DUO_DECODE_MERGE_WIDE (0: one group a merge block), DUO_PDL (1), DUO_TIME_PLACEMENT
#      (contiguous), DUO_TIME_V_SKEW (bytes), DUO_DECODE_V_SMEM (1: values of a byte cache
#      through shared memory), DUO_DECODE_TILE (128: byte caches copy and wait per 128 keys,
#      each warp two 16-key slices), DUO_TIME_KV (one cache type's
#      tensor-core rows alone);
#      env ROWS: which timing rows to print (a regular expression, default the tensor-core
#      bf16 ones); env TIMINGS: cuda-check's --timings (default decode; decode,split adds the
#      quantised caches' split sweep);
#   3. with MODEL=1, the whole model's parity (`cuda-check --only model`: every cache type,
#      continuous batching); with STEP_KVS (e.g. "bf16 fp8 int8 int4"; carry .gpu/patterns
#      too), the whole decode step of the Llama-3-8B shape, full and duo 0.5 at 128K and 512K,
#      per cache type;
#   with TORCH=1, PyTorch SDPA's decode attention on the same shapes before duo's timings;
#   4. with NCU=1 (and SOURCE=1: per-line counters), Nsight Compute on duo's partial kernel (full layer, 1 x 131072 tokens;
#      env NCU_VARS: settings as above, e.g. DUO_TIME_KV=fp8 for the fp8 kernel) and, with NCU_SDPA=1, on PyTorch SDPA's decode kernels on the same shape: bandwidth, occupancy, issue.
# Everything lands in $OUT/results.tgz (the device tool brings back at most 8 files).
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
n=0
for pv in default ${PARITY_VARS:-DUO_PDL=1}; do
  n=$((n + 1)); vars=""; [ "$pv" = default ] || vars=${pv//,/ }
  # The first run compiles the forms the kernel cache lacks (all of them where no filled
  # cache was carried: .gpu/bin/kc.tar.xz, scripts/gpu-prep.sh): more time.
  timeout $([ $n = 1 ] && echo 400 || echo 200) env $vars $D cuda-check --only decode --no-timings > "$OUT/decode-parity-$n.txt" 2>&1
  echo "decode parity ($pv) exit $?: $(grep -c '^ok' "$OUT/decode-parity-$n.txt") ok"; grep "^FAIL" "$OUT/decode-parity-$n.txt" | head
done
if [ "${MODEL:-0}" = 1 ]; then
  timeout 300 $D cuda-check --only model --no-timings > "$OUT/model-parity.txt" 2>&1
  echo "model parity exit $?: $(grep -c '^ok' "$OUT/model-parity.txt") ok"; grep "^FAIL" "$OUT/model-parity.txt" | head
fi
for kv in ${STEP_KVS:-}; do
  timeout 60 $D bench --device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --kv-dtype $kv \
    --methods full,duo --sparsity 0.5 --sink 64 --recent 256 --lengths 131072,524288 --max-prefill 0 --decode-tokens 8 > "$OUT/step-$kv.txt" 2>&1
  echo "step $kv exit $?"; grep -E "^\| (full|duo)" "$OUT/step-$kv.txt" | cut -d'|' -f2,4,7-9
done
# With TORCH=1, PyTorch SDPA's decode attention on the same shapes first (the peer in the
# same call).
if [ "${TORCH:-0}" = 1 ]; then
  timeout 120 python3 scripts/torch_decode_attention.py --out "$OUT/decode-attention-torch.json" 2>&1 | tee "$OUT/decode-attention-torch.txt" | tail -8
fi
i=0
for v in default ${VARIANTS:-DUO_PDL=1 DUO_DECODE_STAGES=4,DUO_DECODE_MIN_BLOCKS=1 DUO_DECODE_L2_PREFETCH=0}; do
  i=$((i + 1)); vars=""; [ "$v" = default ] || vars=${v//,/ }
  timeout 120 env $vars $D cuda-check --only ops --timings ${TIMINGS:-decode} > "$OUT/decode-$i.txt" 2>&1
  echo "== $v (exit $?)"; grep -E "${ROWS:-Tensor +Bf16}" "$OUT/decode-$i.txt" | sed 's/time decode attention, Llama-3-8B layer, //'
done
[ "${NCU:-0}" = 1 ] || exit 0
# SOURCE=1 adds the per-line counters (NVRTC builds with -lineinfo): which source lines the
# partial kernel's instructions and stalls come from.
src=""
if [ "${SOURCE:-0}" = 1 ]; then export DUO_NVRTC_LINEINFO=1; src="--section SourceCounters --section InstructionStats"; fi
NCU="ncu --clock-control none --print-details all $src --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables --section WarpStateStats --section Occupancy --section LaunchStats --section SchedulerStats"
timeout 240 env ${NCU_VARS:-} $NCU -k duo_decode_partial_tc --launch-skip 5 --launch-count 1 $D cuda-check --only ops --timings decode > "$OUT/ncu-duo.txt" 2>&1; echo "ncu duo exit $?"
grep -E "duo_decode|DRAM Throughput|Memory Throughput|L2 Cache Throughput|Duration|Achieved Occupancy|Registers Per|Issued Warp|No Eligible|L2 Hit|Block Limit" "$OUT/ncu-duo.txt" | head -60
# (The memory tables, with --print-details all: L1 and L2 requests, sectors and hits by kind
# of access, the question of session 26's call 8: why a third or more of the partial
# kernel's L2 sector requests hit where cuDNN's kernel's do not.)
[ "${NCU_SDPA:-0}" = 1 ] || exit 0
cat > /tmp/sdpa_one.py <<'PY'
import torch, torch.nn.functional as F
q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
k = torch.randn(1, 8, 131072, 128, dtype=torch.bfloat16, device="cuda"); v = torch.randn_like(k)
for _ in range(8): F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
torch.cuda.synchronize()
PY
timeout 240 $NCU --launch-skip 12 --launch-count 2 python3 /tmp/sdpa_one.py > "$OUT/ncu-sdpa.txt" 2>&1; echo "ncu sdpa exit $?"
grep -E "^  [a-zA-Z_].*\(|DRAM Throughput|L2 Cache Throughput|Duration|Achieved Occupancy|Registers Per|Issued Warp|No Eligible|L2 Hit" "$OUT/ncu-sdpa.txt" | cut -c1-160 | head -30

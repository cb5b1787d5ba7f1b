#!/usr/bin/env bash
# Session 28, call 2: which of duo's requests does the L2 see twice? Nsight Compute's full
# set on duo's bf16 partial kernel (1 x 128K, Llama-3-8B layer) and on cuDNN's kernel behind
# PyTorch's SDPA (the same shape), each saved as a report; from each: every raw metric
# (the L2's lookups by source unit: the SMs' texture path, the other partition's fabric), the
# memory tables in full, and the SASS with per-instruction counters (what each kernel's
# copies are: LDGSTS with which cache and prefetch modifiers).
# Carry .gpu/bin.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
ncu --version | tail -1
cat > /tmp/sdpa_one.py <<'PY'
import torch, torch.nn.functional as F
q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
k = torch.randn(1, 8, 131072, 128, dtype=torch.bfloat16, device="cuda"); v = torch.randn_like(k)
for _ in range(8): F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
torch.cuda.synchronize()
PY
NCU="ncu --clock-control none --set full --import-source no"
timeout 120 $NCU -o /tmp/duo-rep -k duo_decode_partial_tc --launch-skip 5 --launch-count 1 $D cuda-check --only ops --timings decode > "$OUT/ncu-duo-run.txt" 2>&1; echo "ncu duo exit $? ($((SECONDS - start)) s)"
timeout 120 $NCU -o /tmp/sdpa-rep -k regex:flash_fprop --launch-skip 6 --launch-count 1 python3 /tmp/sdpa_one.py > "$OUT/ncu-sdpa-run.txt" 2>&1; echo "ncu sdpa exit $? ($((SECONDS - start)) s)"
for r in duo sdpa; do
  [ -f /tmp/$r-rep.ncu-rep ] || { echo "no report $r"; continue; }
  ncu -i /tmp/$r-rep.ncu-rep --page details --print-details all > "$OUT/$r-details.txt" 2>&1
  ncu -i /tmp/$r-rep.ncu-rep --page raw --csv > "$OUT/$r-raw.csv" 2>&1
  ncu -i /tmp/$r-rep.ncu-rep --page source --print-source sass --csv > "$OUT/$r-sass.csv" 2>&1
  echo "== $r: $(wc -c < "$OUT/$r-raw.csv") bytes raw, $(wc -l < "$OUT/$r-sass.csv") sass lines"
  grep -E "L2 Hit Rate|Duration|DRAM Throughput" "$OUT/$r-details.txt" | head -3
done
echo "total $((SECONDS - start)) s"

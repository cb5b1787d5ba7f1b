#!/usr/bin/env bash
# Session 26, call 1: what each launch of a 128K decode step costs inside its CUDA graph.
# The binary carries a measurement-only knob (DUO_STEP_OMIT=a,b: those launches left out of
# every layer; the patch is session26/step-omit.diff, not in the tree), so each row below is
# the step without one kind of launch: its in-graph cost is the difference from the first.
# Then Nsight Compute's memory tables on duo's bf16 partial kernel and on SDPA's (1 x 128K).
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT

P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
start=$SECONDS
for v in none norm rope merge silu qkv o gateup down attn norm,rope,merge,silu pdl; do
  [ $((SECONDS - start)) -gt 420 ] && { echo "skipped $v (time)"; continue; }
  vars="DUO_STEP_OMIT=$v"; [ $v = pdl ] && vars="DUO_PDL=1"
  timeout 60 env $vars $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 131072 \
    --max-prefill 0 --decode-tokens 8 > "$OUT/step-$v.txt" 2>&1; echo "== $v exit $? ($((SECONDS - start)) s)"; grep -E "^(full|duo|layer) " "$OUT/step-$v.txt" | sed 's/prefill synthetic KV, //; s/, KV .*//'
done
[ $((SECONDS - start)) -gt 470 ] && exit 0
NCU="ncu --clock-control none --section SpeedOfLight --section MemoryWorkloadAnalysis --section MemoryWorkloadAnalysis_Tables"
timeout 80 $NCU -k duo_decode_partial_tc --launch-skip 5 --launch-count 1 $D cuda-check --only ops --timings decode > "$OUT/ncu-duo.txt" 2>&1; echo "ncu duo exit $?"
cat > /tmp/sdpa_one.py <<'PY'
import torch, torch.nn.functional as F
q = torch.randn(1, 32, 1, 128, dtype=torch.bfloat16, device="cuda")
k = torch.randn(1, 8, 131072, 128, dtype=torch.bfloat16, device="cuda"); v = torch.randn_like(k)
for _ in range(8): F.scaled_dot_product_attention(q, k, v, enable_gqa=True)
torch.cuda.synchronize()
PY
timeout 80 $NCU --launch-skip 12 --launch-count 2 python3 /tmp/sdpa_one.py > "$OUT/ncu-sdpa.txt" 2>&1; echo "ncu sdpa exit $?"
echo "total $((SECONDS - start)) s"

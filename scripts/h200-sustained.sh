#!/usr/bin/env bash
# Is the H200's product rate under a long prefill the one a 14 ms burst measures? (issue 16: the
# 128K prefill's compute floor), one call of the device tool from the repository root on the GPU
# host; carry .gpu/bin (duo.xz). Logs the SM clock, power and throttle reasons every 100 ms while
#   1. `duo bench` prefills 131,072 tokens (full attention, Llama-3-8B, random weights);
#   2. PyTorch runs 8192^3 bf16 products back to back for 12 s, printing the rate per 0.5 s.
# Everything lands in $OUT/results.tgz.
set -uo pipefail
source "$(dirname "$0")/h200-common.sh"
trap pack_out EXIT
nvidia-smi --query-gpu=timestamp,clocks.sm,clocks.max.sm,power.draw,power.limit,temperature.gpu,clocks_event_reasons.active --format=csv -lms 100 > "$OUT/clocks.csv" 2>&1 &
logger=$!
sleep 1; echo "bench start $(date +%T.%N)" > "$OUT/marks.txt"
timeout 120 $D bench --device cuda --random-weights llama-3-8b --methods full --lengths ${PREFILL:-131072} --decode-tokens 3 > "$OUT/prefill.txt" 2>&1
echo "bench exit $?"; grep -E "tokens: prefill|matrix products" "$OUT/prefill.txt"
echo "bench end $(date +%T.%N)" >> "$OUT/marks.txt"; sleep 3
echo "torch start $(date +%T.%N)" >> "$OUT/marks.txt"
timeout 60 python3 - <<'PY' | tee "$OUT/torch-sustained.txt"
import time, torch
n = 8192
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(3):
    a @ b
torch.cuda.synchronize()
start = time.perf_counter(); window = start; done = 0
while time.perf_counter() - start < 12:
    for _ in range(50):
        c = a @ b
    torch.cuda.synchronize(); done += 50
    now = time.perf_counter()
    if now - window >= 0.5:
        print(f"t={now - start:5.2f} s  {done * 2 * n**3 / (now - window) / 1e12:6.1f} TFLOPS", flush=True)
        window = now; done = 0
PY
echo "torch end $(date +%T.%N)" >> "$OUT/marks.txt"
kill $logger
python3 - "$OUT/clocks.csv" "$OUT/marks.txt" <<'PY'
import sys
rows = [l.strip().split(", ") for l in open(sys.argv[1]) if l[0].isdigit()]
print(f"{len(rows)} samples; time, SM clock, power, temperature C, clock event reasons (every 10th sample):")
for r in rows[::10]:
    print("  ", r[0].split()[1], r[1], r[3], r[5], r[6])
PY

#!/usr/bin/env bash
# Runs on the GPU host: identification step timings at 2K/4K/8K, then the head- and
# layer-layout identification runs of SmolLM2 side by side on the one GPU.
# Usage: gpu-identify.sh DUO MODEL OUTDIR STEPS
set -uo pipefail
duo=$1; model=$2; out=$3; steps=$4
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
for len in 2048 4096 8192; do
  "$duo" identify --device cuda --model "$model" --out "$out/time-$len" --steps 4 --min-len $len --max-len $len \
    --length-count 1 --checkpoint-every 1000 > "$out/time-$len.log" 2>&1
  python3 - "$out/time-$len/state.json" $len <<'PY' | tee -a "$out/timing.txt"
import json, sys, statistics
s = json.load(open(sys.argv[1]))
secs = [l["seconds"] for l in s["log"]]
print(f"length {sys.argv[2]}: seconds per step {', '.join(f'{x:.3f}' for x in secs)}; median of steps 2-4 {statistics.median(secs[1:]):.3f}")
PY
done
for layout in head layer; do
  setsid "$duo" identify --device cuda --model "$model" --out "$out/$layout" --layout $layout --steps "$steps" \
    --min-len 2048 --max-len 8192 --checkpoint-every 25 --resume > "$out/$layout.log" 2>&1 &
done
wait
tail -c 600 "$out/head.log" "$out/layer.log"

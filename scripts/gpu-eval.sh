#!/usr/bin/env bash
# Runs on the GPU host's CPUs: the passkey and needle grids of SmolLM2 with the five
# methods at sparsity 0.5, both grids side by side (half the cores each). Resumable:
# rerunning with the same OUTDIR skips finished cells.
# Usage: gpu-eval.sh DUO MODEL HEAD_PATTERN LAYER_PATTERN HAYSTACK OUTDIR SECONDS
set -uo pipefail
duo=$1; model=$2; head=$3; layer=$4; hay=$5; out=$6; secs=$7
threads=$(( $(nproc) / 2 ))
common=(--model "$model" --pattern "$head" --layer-pattern "$layer" --sparsity 0.5
        --lengths 1000,2000,4000,8000 --depths 0.1,0.3,0.5,0.7,0.9 --methods full,duo,layer,streaming,random)
RAYON_NUM_THREADS=$threads timeout "$secs" "$duo" eval passkey "${common[@]}" --out "$out/passkey" > "$out/passkey.log" 2>&1 &
RAYON_NUM_THREADS=$threads timeout "$secs" "$duo" eval niah "${common[@]}" --haystack "$hay" --out "$out/niah" > "$out/niah.log" 2>&1 &
wait
for t in passkey niah; do echo "== $t: $(wc -l < "$out/$t/results.jsonl") cells"; tail -n 8 "$out/$t.log"; done

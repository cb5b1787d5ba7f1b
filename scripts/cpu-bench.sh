#!/usr/bin/env bash
# duo vs llama.cpp on the CPU, side by side in one run (BENCHMARKS.md).
# Needs llama-cpp-python (see ../shared/GPU.md for the build flags) in PYTHON.
set -euo pipefail
cd "$(dirname "$0")/.."
LENGTHS=${LENGTHS:-512,2048,8000}
DECODE=${DECODE:-32}
PYTHON=${PYTHON:-python3}
cargo build --release -q -p duo-cli
MODEL=$(ls "${DUO_CACHE:-$HOME/.cache/duo}"/SmolLM2-135M-Instruct.Q4_1.gguf)
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores; $(date -u +%F)"
./target/release/duo bench --lengths "$LENGTHS" --methods full --decode-tokens "$DECODE"
"$PYTHON" scripts/llama_cpp_bench.py "$MODEL" --lengths "$LENGTHS" --decode "$DECODE" --threads "$(nproc)"

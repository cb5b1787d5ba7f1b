#!/usr/bin/env bash
# Builds a CUDA-enabled `duo` for Hopper GPUs (H100/H200, sm_90) on a machine with no GPU
# and no system CUDA, packs it as .gpu/duo.xz for the GPU host, and prints the binary's
# path (.gpu/duo) as its last line.
#
# - nvcc 13.0 comes from the Python package index (pinned: 13.5's PTX is too new for the
#   host's driver 580), installed once under $DUO_CUDA_TOOLS (default ~/.cache/duo/cuda-13.0).
# - candle-core 0.11.1 pins cudarc to link CUDA libraries at build time; a copy of the
#   registry's candle-core is patched (in target/cuda-patch, never committed) to load them
#   at run time instead, so the binary starts on any host with a driver.
# - Cargo.lock is restored afterwards: the patch is a build-time detail.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
tools=${DUO_CUDA_TOOLS:-$HOME/.cache/duo/cuda-13.0}
cu=$tools/nvidia/cu13
if [ ! -x "$cu/bin/nvcc" ]; then
  echo "installing nvcc 13.0 into $tools ..." >&2
  python3 -m pip install --quiet --target "$tools" "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
    "nvidia-cuda-crt==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-cccl==13.0.*"
fi
cd "$root"
cargo fetch --quiet
registry=$(ls -d "$HOME"/.cargo/registry/src/*/candle-core-0.11.1 | head -n1)
patched=$root/target/cuda-patch/candle-core
rm -rf "$patched" && mkdir -p "$root/target/cuda-patch/lib"
cp -r "$registry" "$patched"
sed -i 's/"cuda-version-from-build-system",/"cuda-13000",/; s/"dynamic-linking",/"dynamic-loading",/' "$patched/Cargo.toml"
grep -q '"dynamic-loading"' "$patched/Cargo.toml" || { echo "patching candle-core failed" >&2; exit 1; }
ln -sf "$cu/lib/libcudart_static.a" "$root/target/cuda-patch/lib/libcudart.a"
cp Cargo.lock target/cuda-patch/Cargo.lock.orig
trap 'cp target/cuda-patch/Cargo.lock.orig Cargo.lock' EXIT
PATH=$cu/bin:$PATH CUDA_COMPUTE_CAP=90 CUDA_ROOT=$cu CUDA_PATH=$cu \
  LIBRARY_PATH=$root/target/cuda-patch/lib:$cu/lib CARGO_TARGET_DIR=$root/target/cuda \
  cargo build --release -p duo-cli --features cuda --config "patch.crates-io.candle-core.path=\"$patched\""
mkdir -p .gpu
strip -o .gpu/duo target/cuda/release/duo
xz -T2 -6 -f -k .gpu/duo
echo "packed for the GPU host: $root/.gpu/duo.xz ($(du -h .gpu/duo.xz | cut -f1))" >&2
echo "$root/.gpu/duo"

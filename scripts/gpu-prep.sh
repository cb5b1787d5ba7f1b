#!/usr/bin/env bash
# Fills .gpu/ (ignored by git) with what the GPU host's calls carry, from a fresh checkout:
#   .gpu/bin/duo.xz      the stripped release binary (the host has no Rust)
#   .gpu/bin/kc.tar.xz   every kernel form's PTX, compiled here by NVRTC 13.0 (the host's),
#                        unpacked into the host's kernel cache by scripts/h200-common.sh: a
#                        fresh machine then loads instead of compiling (minutes of a call)
#   .gpu/m1/p .. m3/p    the default model, xz-packed, in three parts of about 29 MiB: with
#                        the working tree (about 20 MiB) and the binary one part fits in a
#                        call's 64 MiB; calls 1 and 2 leave theirs in /tmp on the warm machine
#                        (scripts/h200-common.sh: stash_part, join_three_parts)
#   .gpu/patterns/       the official Llama-3-8B pattern (bench's Llama-3-8B shape)
#   .gpu/niah            the needle haystack (the needle grids)
# The model comes from duo's cache: run `cargo run --release -p duo-cli -- demo` once first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=${DUO_CACHE:-$HOME/.cache/duo}/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || { echo "no $model: run \`cargo run --release -p duo-cli -- demo\` once to fetch it" >&2; exit 1; }
cargo build --release -p duo-cli
mkdir -p .gpu/bin .gpu/m1 .gpu/m2 .gpu/m3 .gpu/patterns
strip -o .gpu/bin/duo target/release/duo
xz -T2 -6 -f .gpu/bin/duo
kc=$(mktemp -d)
trap 'rm -rf "$kc"' EXIT
# The PTX is kept under keys that name NVRTC's version: the host's is 13.0, which the test
# fetches where no NVRTC loads here (another version on the library path would fill the
# folder with keys the host never asks for).
DUO_KERNEL_CACHE=$kc cargo test --release -p duo-cuda --features cuda --test nvrtc
tar -C "$kc" -cf - . | xz -T2 -6 > .gpu/bin/kc.tar.xz
xz -T2 -6 -c "$model" > .gpu/model.xz
split -n 3 -d .gpu/model.xz .gpu/model.xz.
for i in 1 2 3; do mv ".gpu/model.xz.0$((i - 1))" ".gpu/m$i/p"; done
rm .gpu/model.xz
shared=$root/../shared/reference
rm -rf .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k .gpu/niah
cp -r "$shared/duo-attention-patterns/Llama-3-8B-Instruct-Gradient-1048k" .gpu/patterns/
cp -r "$shared/niah-haystack-paul-graham" .gpu/niah
du -sh .gpu/bin .gpu/m1 .gpu/m2 .gpu/m3 .gpu/patterns .gpu/niah

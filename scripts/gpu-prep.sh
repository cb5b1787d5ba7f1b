#!/usr/bin/env bash
# Fills .gpu/ (ignored by git) with what the GPU host's calls carry, from a fresh checkout:
#   .gpu/bin/duo.xz      the stripped release binary (the host has no Rust)
#   .gpu/bin/kc.tar.xz   every kernel form's PTX, compiled here by NVRTC 13.0 (the host's),
#                        unpacked into the host's kernel cache by scripts/h200-common.sh: a
#                        fresh machine then loads instead of compiling (minutes of a call)
#   .gpu/m1/p .. mN/p    the default model, xz-packed, in DUO_MODEL_PARTS parts (4: about
#                        22 MiB each): with the working tree (33 MiB in session 28) and the
#                        binary (7 MiB) one part fits in a call's 64 MiB, which three parts
#                        no longer did; each call but the last leaves its part in /tmp on
#                        the warm machine, the last joins them (scripts/h200-common.sh:
#                        stash_part, join_parts), so the calls must follow each other within
#                        the 30 s the machine stays warm
#   .gpu/patterns/       the official Llama-3-8B pattern (bench's Llama-3-8B shape)
#   .gpu/niah            the needle haystack (the needle grids)
# The model comes from duo's cache: run `cargo run --release -p duo-cli -- demo` once first.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
model=${DUO_CACHE:-$HOME/.cache/duo}/SmolLM2-135M-Instruct.Q4_1.gguf
[ -f "$model" ] || { echo "no $model: run \`cargo run --release -p duo-cli -- demo\` once to fetch it" >&2; exit 1; }
cargo build --release -p duo-cli
parts=${DUO_MODEL_PARTS:-4}
[[ $parts =~ ^[1-9]$ ]] || { echo "DUO_MODEL_PARTS=$parts: expected 1 to 9 parts" >&2; exit 1; }
rm -rf .gpu/m[0-9]
mkdir -p .gpu/bin .gpu/patterns
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
split -n "$parts" -d .gpu/model.xz .gpu/model.xz.
for i in $(seq 1 "$parts"); do mkdir -p ".gpu/m$i" && mv ".gpu/model.xz.$(printf %02d $((i - 1)))" ".gpu/m$i/p"; done
rm .gpu/model.xz
shared=$root/../shared/reference
rm -rf .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k .gpu/niah
cp -r "$shared/duo-attention-patterns/Llama-3-8B-Instruct-Gradient-1048k" .gpu/patterns/
cp -r "$shared/niah-haystack-paul-graham" .gpu/niah
du -sh .gpu/bin .gpu/m[0-9] .gpu/patterns .gpu/niah

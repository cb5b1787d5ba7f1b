#!/usr/bin/env bash
# The GPU host's 16 CPU cores against llama.cpp (issue 20), in two calls of the device tool,
# from the repository root on the GPU host. Results go to $OUT (one archive).
#   a   carry .gpu/bin (duo.xz), .gpu/model.part1, .gpu/llama (llama-cpp-python's site
#       packages, site.tar.xz, built here for AVX2): leaves the model's first part and
#       llama.cpp in /tmp; with AB=1 also kernel parity on the GPU (`duo cuda-check`) and
#       decode on 8 and 16 threads with the spinning decode team and without it
#       (`DUO_NO_TEAM`), on SmolLM2's shape with seeded weights
#   b   carry .gpu/bin, .gpu/model.part2: duo (f32 and f16 KV, with and without the team) and
#       llama.cpp (f32 KV; f16 KV + flash attention) on 16 threads, both engines' decode
#       scaling over 1-16 threads, duo 0.5 at 8K
set -uo pipefail
step=$1
source "$(dirname "$0")/h200-common.sh"
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Flags" | sed 's/\(Flags:\).*\(avx512[a-z_]*\).*/\1 ... avx512 present .../' > "$OUT/cpu.txt"
grep -m1 -o "avx512_vnni\|avx512vnni" /proc/cpuinfo | head -1 >> "$OUT/cpu.txt"; head -3 "$OUT/cpu.txt"
if [ "$step" = a ]; then
  cp .gpu/model.part1 /tmp/duo/model.part1
  mkdir -p /tmp/llama && tar -xJf .gpu/llama/site.tar.xz -C /tmp/llama
  [ "${AB:-0}" = 1 ] || exit 0
  timeout 300 $D cuda-check --no-timings > "$OUT/cuda-check.txt" 2>&1; echo "cuda-check exit $?: $(grep -c '^ok' "$OUT/cuda-check.txt") ok"
  grep -E "^FAIL" "$OUT/cuda-check.txt" | cut -c1-240 | head -20
  for t in 8 16; do
    for team in on off; do
      env=""; [ $team = off ] && env="DUO_NO_TEAM=1"
      env $env timeout 100 $D bench --random-weights smollm2-135m --lengths 2048 --methods full --decode-tokens 32 --threads $t > "$OUT/ab-$t-$team.txt" 2>&1
      echo "threads $t team $team: $(grep 'tokens:' "$OUT/ab-$t-$team.txt" | head -1)"
    done
  done
elif [ "$step" = b ]; then
  join_model
  M=$DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
  timeout 200 $D bench --lengths 2048,8000 --methods full --decode-tokens 32 --threads 16 --out "$OUT/cpu16-full" > "$OUT/cpu16-duo.txt" 2>&1; echo "duo cpu exit $?"; grep "^|" "$OUT/cpu16-duo.txt"
  timeout 200 $D bench --lengths 2048,8000 --methods full --kv-dtype f16 --decode-tokens 32 --threads 16 --out "$OUT/cpu16-full-f16" > "$OUT/cpu16-duo-f16.txt" 2>&1; echo "f16 KV:"; grep "^| full" "$OUT/cpu16-duo-f16.txt"
  DUO_NO_TEAM=1 timeout 200 $D bench --lengths 2048,8000 --methods full --decode-tokens 32 --threads 16 > "$OUT/cpu16-duo-noteam.txt" 2>&1; echo "no team:"; grep "^| full" "$OUT/cpu16-duo-noteam.txt"
  for kv in f32 f16; do
    timeout 100 $D bench --lengths 8000 --methods duo --sparsity 0.5 --kv-dtype $kv --decode-tokens 32 --threads 16 --out "$OUT/cpu16-duo05-$kv" > "$OUT/cpu16-duo05-$kv.txt" 2>&1; grep "^| duo" "$OUT/cpu16-duo05-$kv.txt"
  done
  for t in 1 2 4 8 16; do
    timeout 100 $D bench --lengths 2048 --methods full --decode-tokens 32 --threads $t > "$OUT/cpu-scaling-$t.txt" 2>&1; echo "threads $t: $(grep '| full' "$OUT/cpu-scaling-$t.txt" | head -1)"
    timeout 100 $D bench --lengths 2048 --methods full --kv-dtype f16 --decode-tokens 32 --threads $t > "$OUT/cpu-scaling-f16-$t.txt" 2>&1; echo "threads $t f16: $(grep '| full' "$OUT/cpu-scaling-f16-$t.txt" | head -1)"
  done
  if [ -d /tmp/llama/llama_cpp ]; then
    PYTHONPATH=/tmp/llama timeout 200 python3 scripts/llama_cpp_bench.py "$M" --lengths 2048,8000 --decode 32 --threads 16 2>&1 | tee "$OUT/llama16.txt"
    PYTHONPATH=/tmp/llama timeout 200 python3 scripts/llama_cpp_bench.py "$M" --lengths 2048,8000 --decode 32 --threads 16 --default-config 2>&1 | tee "$OUT/llama16-default.txt"
    for t in 1 2 4 8; do
      PYTHONPATH=/tmp/llama timeout 100 python3 scripts/llama_cpp_bench.py "$M" --lengths 2048 --decode 32 --threads $t --default-config > "$OUT/llama-scaling-$t.txt" 2>&1; tail -2 "$OUT/llama-scaling-$t.txt"
    done
  fi
fi
# Everything in one archive (the device tool brings back 8 files at most).
pack_out

#!/usr/bin/env bash
# fp8 KV caches on the H200 (issue 15) and the GPU host's 16 CPU cores against llama.cpp
# (issue 20), in two calls of the device tool, from the repository root on the GPU host.
#   a   carry .gpu/bin (duo.xz), .gpu/model.part1, .gpu/llama (llama-cpp-python's site
#       packages, site.tar.xz, built here for AVX2): kernel parity (fp8 decode, prefill, RoPE
#       append, whole model, batching), decode and prefill attention bf16 vs fp8 beside
#       PyTorch's SDPA; leaves the model's first part and llama.cpp in /tmp
#   b   carry .gpu/bin, .gpu/bin2 (cuda_backend.xz), .gpu/model.part2, .gpu/niah,
#       .gpu/wheels-httpx: duo and llama.cpp on 16 CPU threads (and duo's thread scaling); the passkey and
#       needle grids on the GPU with each cache type (KVS); a quantised server under
#       serve-check (SERVE_KV); the decode step of a Llama-3-8B-shaped model per cache type
#       (STEP_KVS), and the longest contexts (LONGEST); with .gpu/mb carried instead of
#       .gpu/model.part2 it joins the xz-packed model that step k left
#   k   carry .gpu/bin, .gpu/ma, .gpu/patterns: every parity group and kernel timing
#       (`duo cuda-check`), the decode step of the Llama-3-8B shape per cache type (STEP_KVS)
#       and the longest contexts (LONGEST), no model needed; leaves the xz-packed model's
#       first part in /tmp for step b
#   p1, p2, ...  carry .gpu/m1 (then .gpu/m2, ...): the model's part left in /tmp for step
#       b, which carries the last part with .gpu/bin, .gpu/niah and .gpu/patterns
#       (scripts/gpu-prep.sh)
# KVS and STEP_KVS entries name a cache type, or a type and the streaming heads' own joined by
# "+" (k8v4+bf16: bf16 windows beside a k8v4 cache, --kv-dtype-streaming).
set -uo pipefail
step=$1
source "$(dirname "$0")/h200-common.sh"
[ -f .gpu/bin2/cuda_backend.xz ] && xz -dc .gpu/bin2/cuda_backend.xz > /tmp/duo/cuda_backend && chmod +x /tmp/duo/cuda_backend
lscpu | grep -E "Model name|^CPU\(s\)|Thread|Flags" | sed 's/\(Flags:\).*\(avx512[a-z_]*\).*/\1 ... avx512 present .../' > "$OUT/cpu.txt"
grep -m1 -o "avx512_vnni\|avx512vnni" /proc/cpuinfo | head -1 >> "$OUT/cpu.txt"; head -3 "$OUT/cpu.txt"
if [ "$step" = a ]; then
  cp .gpu/model.part1 /tmp/duo/model.part1
  timeout 300 $D cuda-check > "$OUT/cuda-check.txt" 2>&1; echo "cuda-check exit $?: $(grep -c '^ok' "$OUT/cuda-check.txt") ok"
  grep -E "^FAIL|Fp8|fp8|Int4" "$OUT/cuda-check.txt" | cut -c1-240 | head -60
  grep -E "time decode|split sweep|time prefill" "$OUT/cuda-check.txt"
  timeout 120 python3 scripts/torch_decode_attention.py --out "$OUT/decode-attention-torch.json" 2>&1 | tee "$OUT/decode-attention-torch.txt" | tail -8
  # The peers' decode and prefill attention on the same shapes (SDPA, FlexAttention, and
  # FlashAttention-4 where .gpu/fa4 holds its unpacked wheels).
  [ -d .gpu/fa4 ] && export PYTHONPATH=$PWD/.gpu/fa4:$PWD/.gpu/fa4/nvidia_cutlass_dsl/dsl_packages
  timeout 300 python3 scripts/attention_peers.py --out "$OUT/attention-peers.json" 2>&1 | tee "$OUT/attention-peers.txt" | tail -14
  # ... and duo's on the same shapes beside them, ratios included (bench's --attention-peers).
  timeout 200 $D bench --device cuda --random-weights llama-3-8b --methods full --lengths 32768 --max-prefill 0 --decode-tokens 4 \
    --attention-peers "$OUT/attention-peers.json" --out "$OUT/bench-attention" > "$OUT/bench-attention.txt" 2>&1; echo "bench attention exit $?"; cat "$OUT/bench-attention/attention.md" 2>/dev/null
  # llama.cpp's build for the next call (it needs the whole model, which step b joins).
  mkdir -p /tmp/llama && tar -xJf .gpu/llama/site.tar.xz -C /tmp/llama && ls /tmp/llama
elif [ "$step" = k ]; then
  cp .gpu/ma/model.xz.part1 /tmp/duo/model.ma
  timeout 330 $D cuda-check > "$OUT/cuda-check.txt" 2>&1; echo "cuda-check exit $?: $(grep -c '^ok' "$OUT/cuda-check.txt") ok"
  grep -E "^FAIL|K8V4|k8v4" "$OUT/cuda-check.txt" | cut -c1-240 | head -40
  grep -E "time decode|time prefill" "$OUT/cuda-check.txt" | head -40
elif [[ $step =~ ^p[0-9]$ ]]; then
  stash_part "${step#p}"
elif [ "$step" = b ]; then
  last=$(ls -d .gpu/m[0-9] 2>/dev/null | sort | tail -1)
  if [ -n "$last" ]; then stash_part "${last#.gpu/m}"; join_parts; elif [ -d .gpu/mb ]; then join_packed_model; else join_model; fi
  M=$DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
  if [ "${CPU:-0}" = 1 ]; then
    # The CPU: duo and llama.cpp side by side on 16 threads, then duo's thread scaling.
    timeout 200 $D bench --lengths 2048,8000 --methods full --decode-tokens 32 --threads 16 --out "$OUT/cpu16-full" > "$OUT/cpu16-duo.txt" 2>&1; echo "duo cpu exit $?"; grep "^|" "$OUT/cpu16-duo.txt"
    timeout 100 $D bench --lengths 8000 --methods duo --sparsity 0.5 --decode-tokens 32 --threads 16 --out "$OUT/cpu16-duo05" > "$OUT/cpu16-duo05.txt" 2>&1; grep "^|" "$OUT/cpu16-duo05.txt"
    for t in 1 2 4 8 16; do
      timeout 100 $D bench --lengths 2048 --methods full --decode-tokens 16 --threads $t --out "$OUT/cpu-scaling-$t" > "$OUT/cpu-scaling-$t.txt" 2>&1; echo "threads $t: $(grep '| full' "$OUT/cpu-scaling-$t.txt" | head -1)"
    done
    if [ -d /tmp/llama/llama_cpp ]; then
      PYTHONPATH=/tmp/llama timeout 200 python3 scripts/llama_cpp_bench.py "$M" --lengths 2048,8000 --decode 32 --threads 16 2>&1 | tee "$OUT/llama16.txt"
      PYTHONPATH=/tmp/llama timeout 200 python3 scripts/llama_cpp_bench.py "$M" --lengths 2048,8000 --decode 32 --threads 16 --default-config 2>&1 | tee "$OUT/llama16-default.txt"
    fi
  fi
  # The GPU grids with each cache type, same cells (KVS, default: all three).
  for spec in ${KVS:-bf16 fp8 int8}; do
    kv=${spec%%+*}; st=""; [ "$spec" != "$kv" ] && st="--kv-dtype-streaming ${spec#*+}"
    for task in passkey niah; do
      extra=""; [ $task = niah ] && extra="--haystack .gpu/niah"; [ $task = passkey ] && extra="--words 32"
      timeout 200 $D eval $task --device cuda --kv-dtype $kv $st --sparsity 0.5 --lengths 1000,2000,4000,8000 --depths 0.1,0.3,0.5,0.7,0.9 \
        --methods full,duo,layer $extra --out "$OUT/grid-$spec-$task" > "$OUT/grid-$spec-$task.txt" 2>&1; echo "$spec $task exit $?"; grep -E "^\| (full|duo|layer) " "$OUT/grid-$spec-$task/summary.md" | cut -c1-200
    done
  done
  # Servers with a byte cache (SERVE_KV, default int8): concurrent requests equal alone,
  # preemptions in a tiny pool, a disconnect. Started one after the other (each counts the
  # memory the other holds). Only where the client's wheels were carried (.gpu/wheels-httpx)
  # and SERVE_KV is not set empty.
  if [ -d .gpu/wheels-httpx ] && [ -n "${SERVE_KV-int8}" ]; then
  python3 -m venv --system-site-packages /tmp/venv > /dev/null && /tmp/venv/bin/pip install --quiet --no-index --find-links .gpu/wheels-httpx httpx==0.28.1 > /dev/null 2>&1
  kvs=${SERVE_KV:-int8}
  $D serve --device cuda --kv-dtype $kvs --port 8123 --method duo --gpu-memory-utilization 0.15 > "$OUT/serve-8123.txt" 2>&1 &
  for i in $(seq 120); do curl -sf localhost:8123/health > /dev/null && break; sleep 0.5; done
  $D serve --device cuda --kv-dtype $kvs --port 8124 --method duo --gpu-memory-utilization 0.3 --num-gpu-blocks-override 150 --max-running 12 > "$OUT/serve-8124.txt" 2>&1 &
  for i in $(seq 120); do curl -sf localhost:8124/health > /dev/null && break; sleep 0.5; done
  grep -h ready "$OUT/serve-8123.txt" "$OUT/serve-8124.txt"
  timeout 240 /tmp/venv/bin/python scripts/serve-check.py --url http://127.0.0.1:8123 --tiny-url http://127.0.0.1:8124 \
    --haystack .gpu/niah --out "$OUT/serve-check-$kvs.json" > "$OUT/serve-check-$kvs.txt" 2>&1; echo "serve-check $kvs exit $?"; tail -6 "$OUT/serve-check-$kvs.txt" | cut -c1-400
  curl -s localhost:8123/metrics | grep -E "^(vllm|duo):(num_requests|kv_blocks|num_preemptions|kv_cache)" | head -8
  kill %1 %2; wait
  fi
  if [ -x /tmp/duo/cuda_backend ]; then
    ( cd /tmp/duo && DUO_CACHE=/tmp/duo/cache timeout 200 ./cuda_backend --test-threads 1 ) > "$OUT/cuda-backend-tests.txt" 2>&1
    echo "cuda_backend tests exit $?"; grep -E "test result|panicked" "$OUT/cuda-backend-tests.txt"
  fi
fi
if [ "$step" = b ] || [ "$step" = k ]; then
  # The decode step of Llama-3-8B's shape with each cache type (synthetic KV, the official
  # pattern at 0.5), then the longest contexts of the byte caches.
  P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
  for spec in ${STEP_KVS:-bf16 fp8 int8}; do
    kv=${spec%%+*}; st=""; [ "$spec" != "$kv" ] && st="--kv-dtype-streaming ${spec#*+}"
    timeout 150 $D bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype $kv $st --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072,524288 \
      --max-prefill 0 --decode-tokens 8 --out "$OUT/step-$spec" > "$OUT/step-$spec.txt" 2>&1; echo "step $spec exit $?"; grep -E "^\| (full|duo|layer)" "$OUT/step-$spec.txt"
  done
  # LONGEST: ";"-separated "dtype method lengths" (default: int8's; LONGEST="" runs none).
  IFS=';' read -ra specs <<< "${LONGEST-int8 duo 3700000,3800000;int8 full 1850000,1900000;int8 layer 3700000,3800000}"
  for spec in "${specs[@]}"; do
    set -- $spec
    timeout 150 $D bench --device cuda --random-weights llama-3-8b --pattern $P --kv-dtype $1 --methods $2 --sparsity 0.5 --lengths $3 --max-prefill 0 --decode-tokens 4 \
      --out "$OUT/longest-$1-$2" > "$OUT/longest-$1-$2.txt" 2>&1; echo "longest $spec exit $?"; grep -E "^\| (full|duo|layer)|does not fit|error" "$OUT/longest-$1-$2.txt" | cut -c1-300
  done
fi
# Everything in one archive (the device tool brings back 8 files at most).
pack_out

#!/usr/bin/env bash
# The GPU measurements of "Serve on the GPU" (issue 14), in calls of the device tool. Run from
# the repository root on the GPU host with .gpu/ carried: .gpu/bin/{duo,cuda_backend}.xz
# (stripped release binaries built here), .gpu/wheels (openai + httpx wheels for Python 3.12),
# .gpu/niah, .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k, and .gpu/model.part1 (step a) or
# .gpu/model.part2 (step b; .gpu/wheels-httpx instead of .gpu/wheels for "b check"). Results go to $OUT.
#   a        kernel parity (paged kernels, the whole model, continuous batching vs alone),
#            decode-attention timings (tensor-core and CUDA-core kernels, by block size and
#            split) beside PyTorch's SDPA; leaves the model's first part in /tmp
#   b        SmolLM2 served on the GPU: 32 concurrent mixed-length requests vs alone, a tiny pool
#            with preemptions, a disconnect, the openai-client test suite; the CUDA backend tests
#   c WL     Llama-3-8B-shaped random checkpoint served with full, duo 0.5 and layer 0.5 at one
#            --gpu-memory-utilization; WL = workload name (see below)
set -uo pipefail
step=$1
source "$(dirname "$0")/h200-common.sh"
venv() {
  python3 -m venv --system-site-packages /tmp/venv > /dev/null
  # .gpu/wheels: openai and httpx; .gpu/wheels-httpx: httpx alone (for calls short of room).
  if [ -d .gpu/wheels ]; then
    /tmp/venv/bin/pip install --quiet --no-index --find-links .gpu/wheels openai==3.57.0 httpx==0.28.1 > /dev/null 2>&1
  else
    /tmp/venv/bin/pip install --quiet --no-index --find-links .gpu/wheels-httpx httpx==0.28.1 > /dev/null 2>&1
  fi
  /tmp/venv/bin/python -c "import httpx; print('httpx', httpx.__version__)"
}
serve() { # port, then duo serve flags; waits for /health
  local port=$1; shift
  $D serve --device cuda --port "$port" "$@" > "$OUT/serve-$port.txt" 2>&1 &
  for i in $(seq 120); do curl -sf "localhost:$port/health" > /dev/null && break; sleep 0.5; done
  grep "ready" "$OUT/serve-$port.txt"
}
if [ "$step" = part1 ]; then
  cp .gpu/model.part1 /tmp/duo/model.part1 && ls -la /tmp/duo
elif [ "$step" = a ]; then
  cp .gpu/model.part1 /tmp/duo/model.part1
  timeout 400 $D cuda-check > "$OUT/cuda-check.txt" 2>&1; echo "cuda-check exit $?: $(grep -c '^ok' "$OUT/cuda-check.txt") ok"
  grep -E "^FAIL|whole model|batching|time decode" "$OUT/cuda-check.txt"
  # PyTorch's decode attention on the same shapes, and the copy bandwidth, in the same call.
  timeout 120 python3 scripts/torch_decode_attention.py --out "$OUT/decode-attention-torch.json" 2>&1 | tee "$OUT/decode-attention-torch.txt"
elif [ "$step" = b ]; then
  join_model
  venv
  only_check=${2:-}
  if [ "$only_check" = check ]; then
    timeout 200 $D cuda-check > "$OUT/cuda-check.txt" 2>&1; echo "cuda-check exit $?: $(grep -c '^ok' "$OUT/cuda-check.txt") ok"
    grep -E "^FAIL|whole model|batching" "$OUT/cuda-check.txt" | cut -c1-260
  fi
  serve 8123 --method duo --gpu-memory-utilization 0.15
  serve 8124 --method duo --gpu-memory-utilization 0.15 --num-gpu-blocks-override 150 --max-running 12
  timeout 300 /tmp/venv/bin/python scripts/serve-check.py --url http://127.0.0.1:8123 --tiny-url http://127.0.0.1:8124 \
    --haystack .gpu/niah --out "$OUT/serve-check.json" > "$OUT/serve-check.txt" 2>&1; echo "serve-check exit $?"; cat "$OUT/serve-check.txt" | cut -c1-1500
  curl -s localhost:8123/metrics | grep -E "^(vllm|duo):(num_requests|kv_blocks|num_preemptions)" | tee "$OUT/metrics-8123.txt"
  kill %1 %2; wait
  [ "$only_check" = check ] && exit 0
  # The openai-client suite of the CPU server, against GPU servers (same flags as its Rust driver).
  serve 8125 --api-key sk-test --max-body-bytes 65536 --gpu-memory-utilization 0.1 --prefill-chunk 64
  serve 8126 --max-waiting 1 --max-running 1 --timeout-keep-alive 1 --timeout-read 1 --gpu-memory-utilization 0.1 --prefill-chunk 64
  DUO_URL=http://127.0.0.1:8125 DUO_KEY=sk-test DUO_TIGHT_URL=http://127.0.0.1:8126 timeout 400 /tmp/venv/bin/python -m unittest -v tests/serve/test_openai.py > "$OUT/openai-tests.txt" 2>&1
  echo "openai tests exit $?"; grep -E "^(Ran|OK|FAILED)|(FAIL|ERROR):" "$OUT/openai-tests.txt"
  kill %1 %2; wait
  ( cd /tmp/duo && timeout 300 ./cuda_backend --nocapture --test-threads 1 ) > "$OUT/cuda-backend-tests.txt" 2>&1
  echo "cuda_backend tests exit $?"; grep -E "test result|panicked" "$OUT/cuda-backend-tests.txt"
elif [ "$step" = c ]; then
  wl=$2; shift 2
  [ -f /tmp/l3/config.json ] || /usr/bin/time -f "random checkpoint %e s" $D random-checkpoint --shape llama-3-8b --out /tmp/l3 --seed 0 2>&1 | tail -2
  venv > /dev/null
  P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
  # Every server: the official pattern at 0.5 (full ignores it), sink 128 + recent 256 as in
  # the H100 table, prefill chunks of $CHUNK (default 1024).
  common="--device cuda --model /tmp/l3 --pattern $P --sparsity 0.5 --sink 128 --recent 256 --prefill-chunk ${CHUNK:-1024} $*"
  case $wl in
    a) args=(--requests 64 --prompt-tokens 32768 --max-tokens 1024);;
    b) args=(--requests 16 --prompt-tokens 131072 --max-tokens 256);;
    a2) args=(--requests 24 --prompt-tokens 16384 --max-tokens 256);;
    a3) args=(--requests 48 --prompt-tokens 16384 --max-tokens 512);;
    b2) args=(--requests 8 --prompt-tokens 65536 --max-tokens 128);;
    *) read -r -a args <<< "$WL_ARGS";;
  esac
  timeout ${BENCH_TIMEOUT:-560} /tmp/venv/bin/python scripts/serve-bench.py --duo $D --methods "${METHODS:-full,duo,layer}" --random-prompts 1000 --vocab 128000 \
    --probe-tokens 1024 --serve-args "$common" "${args[@]}" --out "$OUT/serve-$wl" > "$OUT/serve-$wl.txt" 2>&1
  echo "serve-bench exit $?"; cat "$OUT/serve-$wl.txt" | cut -c1-900; cat "$OUT/serve-$wl/summary.md" 2>/dev/null
fi

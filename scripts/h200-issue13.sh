#!/usr/bin/env bash
# The GPU measurements of "One engine, two backends", in two calls of the device tool (the
# 98 MB default model travels in two parts). Run from the repository root on the GPU host with
# .gpu/ carried: .gpu/bin/{duo,cuda_backend}.xz (stripped release binaries built here),
# .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k, and .gpu/model.part1 (call a) or
# .gpu/model.part2 + .gpu/niah (call b). Results go to $OUT.
#   scripts/h200-issue13.sh a   kernel parity; random checkpoint written and loaded; bench
#                               --random-weights vs --model DIR (same seed, same weights)
#   scripts/h200-issue13.sh part1   only leaves the model's first part in /tmp (before b or c)
#   scripts/h200-issue13.sh c   the RULER-style table on the GPU (issue 18's task suite)
#   scripts/h200-issue13.sh b   kernel parity (dequantisation included); SmolLM2 and small
#                               GGUF files of every GPU type vs the CPU engine (test binary), demo,
#                               passkey and needle grids on the GPU, generate, serve
set -uo pipefail
step=$1
source "$(dirname "$0")/h200-common.sh"
if [ "$step" = part1 ]; then
  cp .gpu/model.part1 /tmp/duo/model.part1 && ls -la /tmp/duo
elif [ "$step" = a ]; then
  cp .gpu/model.part1 /tmp/duo/model.part1
  timeout 240 $D cuda-check > "$OUT/cuda-check.txt" 2>&1; echo "cuda-check exit $?"; grep -c "^ok" "$OUT/cuda-check.txt"; grep -v "^ok" "$OUT/cuda-check.txt" | head -5
  rm -rf /tmp/l3
  /usr/bin/time -v $D random-checkpoint --shape llama-3-8b --out /tmp/l3 --seed 0 > "$OUT/random-checkpoint.txt" 2>&1
  grep -E "GiB|Maximum resident|Elapsed" "$OUT/random-checkpoint.txt"; ls -la /tmp/l3 | head
  P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
  common=(--device cuda --methods full,duo --pattern "$P" --sparsity 0.5 --sink 128 --recent 256 --chunk 16384
          --lengths 16384,131072,524288 --max-prefill 16384 --decode-tokens 34)
  for run in random ckpt random2 ckpt2; do
    case $run in random*) src=(--random-weights llama-3-8b);; *) src=(--model /tmp/l3);; esac
    /usr/bin/time -v $D bench "${src[@]}" "${common[@]}" --out "$OUT/bench-$run" > "$OUT/bench-$run.txt" 2>&1
    echo "== $run"; grep -E "loaded in|tokens:|Maximum resident" "$OUT/bench-$run.txt"
  done
elif [ "$step" = c ]; then
  join_model
  /usr/bin/time -f "ruler wall %e s" $D eval ruler --device cuda --sparsity 0.5 --lengths 1000,2000,4000,8000 --depths 0.2,0.5,0.8 \
    --methods full,duo,layer,streaming,random --haystack .gpu/niah --out "$OUT/ruler" > "$OUT/ruler.txt" 2>&1
  tail -16 "$OUT/ruler.txt"
  tar czf "$OUT/ruler.tgz" -C "$OUT" ruler && rm -rf "$OUT/ruler"
else
  join_model
  timeout 240 $D cuda-check > "$OUT/cuda-check.txt" 2>&1; echo "cuda-check exit $?: $(grep -c '^ok' "$OUT/cuda-check.txt") ok"; grep -E "^FAIL|dequant" "$OUT/cuda-check.txt"
  ( cd /tmp/duo && timeout 600 ./cuda_backend --nocapture --test-threads 1 ) > "$OUT/cuda-backend-tests.txt" 2>&1
  echo "cuda_backend tests exit $?"; grep -E "same greedy token|logprobs of|test result|panicked|next token cpu" "$OUT/cuda-backend-tests.txt"
  /usr/bin/time -f "demo wall %e s" $D demo --device cuda > "$OUT/demo-cuda.txt" 2>&1; tail -6 "$OUT/demo-cuda.txt"
  $D generate --device cuda --chat --max-tokens 40 "Tell me about the sea." > "$OUT/generate.txt" 2>&1; tail -2 "$OUT/generate.txt"
  grid=(--sparsity 0.5 --lengths 1000,2000,4000,8000 --depths 0.1,0.3,0.5,0.7,0.9 --methods full,duo,layer,streaming,random --device cuda)
  /usr/bin/time -f "passkey grid wall %e s" $D eval passkey "${grid[@]}" --words 32 --out "$OUT/eval-passkey" > "$OUT/eval-passkey.txt" 2>&1; tail -9 "$OUT/eval-passkey.txt"
  /usr/bin/time -f "niah grid wall %e s" $D eval niah "${grid[@]}" --haystack .gpu/niah --out "$OUT/eval-niah" > "$OUT/eval-niah.txt" 2>&1; tail -9 "$OUT/eval-niah.txt"
  $D serve --device cuda --port 8123 --method duo > "$OUT/serve.txt" 2>&1 &
  pid=$!
  for i in $(seq 60); do curl -sf localhost:8123/health > /dev/null && break; sleep 1; done
  curl -s localhost:8123/v1/chat/completions -H 'Content-Type: application/json' \
    -d '{"messages":[{"role":"user","content":"What is the capital of France?"}],"max_tokens":24,"temperature":0}' | tee "$OUT/serve-reply.json"; echo
  curl -s localhost:8123/metrics | grep -E "kv_cache_bytes|request_success" | tee "$OUT/serve-metrics.txt"
  kill $pid
  # The device tool returns a few files: one archive of the grids (results, summaries, heatmaps).
  tar czf "$OUT/grids.tgz" -C "$OUT" eval-passkey eval-niah && rm -rf "$OUT/eval-passkey" "$OUT/eval-niah"
fi

#!/usr/bin/env bash
# Tensor parallelism over the two-GPU H200 host (issue 17), in calls of the device tool with
# kind nvidia-h200-x2, from the repository root there. NCCL_NVLS_ENABLE=0 is set here and by
# duo itself before NCCL loads.
#   a   carry .gpu/bin (duo.xz), .gpu/patterns (the official Llama-3-8B and Llama-2-7B ones): the
#       tp parity group (both placements against the unsplit reference and one GPU's
#       tokens) and the model group; then Llama-3-8B-shaped random weights, duo 0.5 with the
#       official pattern: a decode step at 1M tokens on one GPU, on two with each placement
#       (and Llama-2-7B's at 0.75 and 512K);
#       the longest contexts (env LONGEST_1, LONGEST_2: tokens of synthetic KV); prefill of
#       PREFILL tokens (default 131072) on one GPU and on two
#   b   carry .gpu/bin, .gpu/patterns/...: a random Llama-3-8B checkpoint on disk, then
#       greedy tokens of full, duo and layer on one GPU and on two (duo generate), compared
#   c   carry .gpu/bin, .gpu/ma (model.xz.part1: the default model packed by `xz -6`, its
#       first 41,500,000 bytes): leaves them in /tmp
#   d   carry .gpu/mb (model.xz.part2, the rest), .gpu/niah, .gpu/wheels-httpx: SmolLM2 (3 KV heads: 2 + 1
#       per layer over two GPUs) greedy text of full, duo and layer on one GPU and on two,
#       and of duo as two processes (--tp-rank, --tp-rendezvous); serve-check against
#       `duo serve --tensor-parallel 2` (and a tiny pool of it)
#   e   carry .gpu/bin, .gpu/patterns, .gpu/ma: the all-reduce timed alone, the 1M duo step
#       under each NCCL protocol, the one-GPU decode and prefill parity (and the wgmma
#       kernel's other forms'); leaves the model's first part in /tmp as c does
#   g   carry .gpu/bin, .gpu/patterns: the tp parity and timings (all-reduce, half a layer's decode attention),
#       the 128K duo step on one GPU and on two; the overlapped prefill (DUO_TP_OVERLAP=1):
#       its parity and 128K of prefill beside the plain one
#   f   carry .gpu/mb (after e or c on the same warm machine): SmolLM2's greedy tokens on one
#       GPU and on two, where they part, and each continuation scored on both
# Each step's files come back packed in $OUT/results.tgz.
set -uo pipefail
step=$1
export NCCL_NVLS_ENABLE=0
source "$(dirname "$0")/h200-common.sh"
# Steps a, b and d write more files than the device tool brings back.
trap pack_out EXIT
nvidia-smi topo -m | head -4 > "$OUT/topo.txt"
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
shape="--device cuda --random-weights llama-3-8b --pattern $P --sparsity 0.5 --sink 128 --recent 256"
common="$shape --max-prefill 0 --decode-tokens 10"
case $step in
  a)
    timeout 300 $D cuda-check --only tp,model --no-timings > "$OUT/cuda-check.txt" 2>&1
    rc=$?; echo "cuda-check exit $rc: $(grep -c '^ok' "$OUT/cuda-check.txt") ok"; grep -E "^FAIL|tensor parallel|error" "$OUT/cuda-check.txt" | cut -c1-300
    # NCCL warns that CUDA graphs over several GPUs of one process may deadlock; if the check
    # hung (timeout), once more without NCCL's graph mixing, to tell which.
    if [ $rc = 124 ]; then
      NCCL_GRAPH_MIXING_SUPPORT=0 timeout 200 $D cuda-check --only tp --no-timings > "$OUT/cuda-check-nomix.txt" 2>&1
      echo "cuda-check without graph mixing exit $?"; grep -E "^FAIL|tensor parallel|error" "$OUT/cuda-check-nomix.txt" | cut -c1-300
    fi
    for run in "one:" "aware:--tensor-parallel 2" "contiguous:--tensor-parallel 2 --placement contiguous"; do
      name=${run%%:*}; flags=${run#*:}
      timeout 150 $D bench $common --methods full,duo --lengths 1048576 $flags --out "$OUT/step-$name" > "$OUT/step-$name.txt" 2>&1
      echo "== decode step, $name (exit $?)"; grep -E "tokens:|could not|does not fit|Error|error" "$OUT/step-$name.txt" | cut -c1-200
    done
    # Llama-2-7B (MHA, 32 KV heads) with its official pattern at 0.75: the step at 512K, both placements.
    P2=.gpu/patterns/Llama-2-7B-32K-Instruct
    for run in "one:" "aware:--tensor-parallel 2" "contiguous:--tensor-parallel 2 --placement contiguous"; do
      name=${run%%:*}; flags=${run#*:}
      timeout 120 $D bench --device cuda --random-weights llama-2-7b --pattern $P2 --sparsity 0.75 --sink 128 --recent 256 --max-prefill 0 --decode-tokens 10 \
        --methods duo --lengths 524288 $flags --out "$OUT/l2-$name" > "$OUT/l2-$name.txt" 2>&1
      echo "== Llama-2-7B decode step, $name (exit $?)"; grep -E "tokens:|does not fit|rror" "$OUT/l2-$name.txt" | cut -c1-200
    done
    timeout 120 $D bench $common --methods duo --lengths ${LONGEST_1:-1900000} --out "$OUT/longest-one" > "$OUT/longest-one.txt" 2>&1
    echo "== longest, one GPU (exit $?)"; grep -E "tokens:|does not fit|rror" "$OUT/longest-one.txt" | cut -c1-200
    timeout 150 $D bench $common --methods duo --lengths ${LONGEST_2:-3800000} --tensor-parallel 2 --out "$OUT/longest-two" > "$OUT/longest-two.txt" 2>&1
    echo "== longest, two GPUs (exit $?)"; grep -E "tokens:|does not fit|rror" "$OUT/longest-two.txt" | cut -c1-200
    for run in "one:" "two:--tensor-parallel 2"; do
      name=${run%%:*}; flags=${run#*:}
      timeout 150 $D bench $shape --max-prefill ${PREFILL:-131072} --methods duo --lengths ${PREFILL:-131072} --decode-tokens 3 $flags --out "$OUT/prefill-$name" > "$OUT/prefill-$name.txt" 2>&1
      echo "== prefill, $name (exit $?)"; grep -E "tokens:|rror" "$OUT/prefill-$name.txt" | cut -c1-200
    done ;;
  b)
    [ -f /tmp/l3/config.json ] || /usr/bin/time -f "random checkpoint %e s" $D random-checkpoint --shape llama-3-8b --out /tmp/l3 --seed 0 2>&1 | tail -2
    prompt="The quick brown fox jumps over the lazy dog. In the beginning there was"
    for method in full duo layer; do
      extra=""; [ $method = layer ] && extra="--layout layer"; [ $method != full ] && extra="$extra --pattern $P --sparsity 0.5"
      m=$method; [ $method = layer ] && m=duo
      for tp in 1 2; do
        timeout 200 $D generate --device cuda --model /tmp/l3 --method $m $extra --tensor-parallel $tp --max-tokens 32 --seed 0 "$prompt" > "$OUT/gen-$method-$tp.txt" 2> "$OUT/gen-$method-$tp.err"
        echo "$method on $tp GPU(s): exit $?"
      done
      cmp -s "$OUT/gen-$method-1.txt" "$OUT/gen-$method-2.txt" && echo "$method: the same text on 1 and 2 GPUs" || { echo "$method: DIFFERENT"; tail -2 "$OUT/gen-$method-2.err"; }
    done ;;
  c) cp .gpu/ma/model.xz.part1 /tmp/duo/model.ma && ls -la /tmp/duo ;;
  e)
    cp .gpu/ma/model.xz.part1 /tmp/duo/model.ma
    # Where a two-GPU step's time goes: the all-reduce alone (one by one and from a graph),
    # and the 1M-token duo step under each of NCCL's protocols; the one-GPU kernels' parity.
    timeout 120 $D cuda-check --only ops --timings tp > "$OUT/allreduce.txt" 2>&1
    echo "all-reduce timings exit $?"; grep -E "^time all-reduce|^FAIL|rror" "$OUT/allreduce.txt" | cut -c1-200
    for proto in default LL LL128 Simple; do
      env=""; [ $proto = default ] || env="NCCL_PROTO=$proto"
      timeout 100 env $env $D bench $common --methods duo --lengths 1048576 --tensor-parallel 2 --out "$OUT/proto-$proto" > "$OUT/proto-$proto.txt" 2>&1
      echo "== duo step at 1M over two GPUs, NCCL protocol $proto (exit $?)"; grep -E "tokens:|rror" "$OUT/proto-$proto.txt" | cut -c1-200
    done
    timeout 200 $D cuda-check --only decode,prefill --no-timings > "$OUT/parity.txt" 2>&1
    echo "decode + prefill parity exit $?: $(grep -c '^ok' "$OUT/parity.txt") ok"; grep -E "^FAIL" "$OUT/parity.txt" | cut -c1-200 | head
    for ws in 0 1; do
      timeout 60 env DUO_PREFILL_WS=$ws $D cuda-check --only prefill --no-timings > "$OUT/ws$ws-parity.txt" 2>&1
      echo "warp-specialised wgmma form $ws: parity exit $?: $(grep -c '^ok' "$OUT/ws$ws-parity.txt") ok"; grep -E "^FAIL" "$OUT/ws$ws-parity.txt" | cut -c1-200 | head -4
    done ;;
  g)
    # The tp parity (two GPUs against one fed the same tokens), the all-reduce and half a
    # layer's decode attention timed, and the 128K duo step on one GPU and on two (also with
    # duo's own matrix-vector products).
    timeout 150 $D cuda-check --only tp --timings tp > "$OUT/tp-check.txt" 2>&1
    echo "tp check exit $?"; grep -E "^ok|^FAIL|^time|rror" "$OUT/tp-check.txt" | cut -c1-330
    for run in "one::" "two:--tensor-parallel 2:" "two-gemv:--tensor-parallel 2:DUO_STEP_GEMV=1"; do
      IFS=: read -r name flags env <<< "$run"
      timeout 100 env $env $D bench $common --methods duo --lengths 131072 $flags --out "$OUT/step128k-$name" > "$OUT/step128k-$name.txt" 2>&1
      echo "== duo step at 128K, $name (exit $?)"; grep -E "tokens:|rror" "$OUT/step128k-$name.txt" | cut -c1-200
    done
    # The prefill's all-reduces overlapped with the other half chunk's work (DUO_TP_OVERLAP=1):
    # its parity, then 128K of prefill on one GPU, on two, and on two overlapped.
    timeout 150 env DUO_TP_OVERLAP=1 $D cuda-check --only tp --no-timings > "$OUT/tp-check-overlap.txt" 2>&1
    echo "tp check, overlapped prefill: exit $?"; grep -E "^FAIL|rror" "$OUT/tp-check-overlap.txt" | cut -c1-300
    for run in "one::" "two:--tensor-parallel 2:" "two-overlap:--tensor-parallel 2:DUO_TP_OVERLAP=1"; do
      IFS=: read -r name flags env <<< "$run"
      timeout 150 env $env $D bench $shape --max-prefill ${PREFILL:-131072} --methods duo --lengths ${PREFILL:-131072} --decode-tokens 3 $flags --out "$OUT/prefill-$name" > "$OUT/prefill-$name.txt" 2>&1
      echo "== prefill, $name (exit $?)"; grep -E "tokens:|rror" "$OUT/prefill-$name.txt" | cut -c1-200
    done ;;
  f)
    # SmolLM2 on one GPU and on two: where the greedy tokens part, and how close the two
    # candidates were there (each continuation scored on one GPU).
    join_packed_model
    echo "The history of the lighthouse begins in ancient Egypt, where" > /tmp/duo/prompt.txt
    for tp in 1 2; do
      timeout 120 $D generate --device cuda --method duo --tensor-parallel $tp --max-tokens 64 --json --prompt-file /tmp/duo/prompt.txt > "$OUT/plain-$tp.json" 2> "$OUT/plain-$tp.err"
      echo "plain prompt on $tp GPU(s): exit $?"
    done
    python3 - "$OUT" <<'PY'
import json, sys
o = sys.argv[1]
a, b = (json.load(open(f"{o}/plain-{t}.json")) for t in (1, 2))
x, y = a["completion_token_ids"], b["completion_token_ids"]
i = next((k for k in range(min(len(x), len(y))) if x[k] != y[k]), None)
print("completion tokens equal" if i is None else f"first difference at completion token {i}: {x[i]} (one GPU) vs {y[i]} (two)")
open(f"{o}/cont-1.txt", "w").write(a["text"]); open(f"{o}/cont-2.txt", "w").write(b["text"])
PY
    for c in 1 2; do for tp in 1 2; do
      timeout 120 $D score --device cuda --method duo --tensor-parallel $tp --prompt-file /tmp/duo/prompt.txt --continuation-file "$OUT/cont-$c.txt" > "$OUT/score-c$c-tp$tp.txt" 2>&1
      echo "continuation of $c GPU(s) scored on $tp: $(tail -1 "$OUT/score-c$c-tp$tp.txt")"
    done; done
    for method in full duo layer; do
      extra=""; m=$method; [ $method = layer ] && { extra="--layout layer"; m=duo; }
      for tp in 1 2; do
        timeout 120 $D generate --device cuda --method $m $extra --tensor-parallel $tp --max-tokens 64 --json --chat "Write a short story about a lighthouse keeper who finds a message in a bottle." > "$OUT/chat-$method-$tp.json" 2>/dev/null
      done
      python3 -c "
import json; a,b=(json.load(open('$OUT/chat-$method-%d.json'%t))['completion_token_ids'] for t in (1,2))
i=next((k for k in range(min(len(a),len(b))) if a[k]!=b[k]),None); print('$method chat: equal' if i is None else '$method chat: first difference at completion token %d of %d' % (i, len(a)))"
    done ;;
  d)
    join_packed_model  # (already in place after scripts/h200-issue18.sh c on this warm machine)
    prompt="Write a short story about a lighthouse keeper who finds a message in a bottle."
    for method in full duo layer; do
      extra=""; m=$method; [ $method = layer ] && { extra="--layout layer"; m=duo; }
      for tp in 1 2; do
        timeout 120 $D generate --device cuda --method $m $extra --tensor-parallel $tp --max-tokens 64 --chat "$prompt" > "$OUT/smol-$method-$tp.txt" 2> "$OUT/smol-$method-$tp.err"
        echo "$method on $tp GPU(s): exit $?"
      done
      cmp -s "$OUT/smol-$method-1.txt" "$OUT/smol-$method-2.txt" && echo "$method: the same text on 1 and 2 GPUs" || { echo "$method: DIFFERENT"; tail -2 "$OUT/smol-$method-2.err"; }
    done
    # The same split as two processes, one GPU each (how hosts beyond one are run): both
    # ranks print the same text, which must be one GPU's.
    for r in 0 1; do
      timeout 120 $D generate --device cuda:$r --method duo --tensor-parallel 2 --tp-rank $r --tp-rendezvous 127.0.0.1:29511 \
        --max-tokens 64 --chat "$prompt" > "$OUT/smol-duo-rank$r.txt" 2> "$OUT/smol-duo-rank$r.err" &
    done
    wait
    for r in 0 1; do cmp -s "$OUT/smol-duo-1.txt" "$OUT/smol-duo-rank$r.txt" && echo "rank $r of two processes: one GPU's text" || { echo "rank $r: DIFFERENT"; tail -3 "$OUT/smol-duo-rank$r.err"; }; done
    python3 -m venv --system-site-packages /tmp/venv > /dev/null && /tmp/venv/bin/pip install --quiet --no-index --find-links .gpu/wheels-httpx httpx==0.28.1 > /dev/null 2>&1
    $D serve --device cuda --tensor-parallel 2 --method duo --port 8123 --gpu-memory-utilization 0.15 > "$OUT/serve-8123.txt" 2>&1 &
    serve1=$!
    $D serve --device cuda --tensor-parallel 2 --method duo --port 8124 --gpu-memory-utilization 0.15 --num-gpu-blocks-override 150 --max-running 12 > "$OUT/serve-8124.txt" 2>&1 &
    serve2=$!
    for port in 8123 8124; do for i in $(seq 120); do curl -sf "localhost:$port/health" > /dev/null && break; sleep 0.5; done; done
    timeout 300 /tmp/venv/bin/python scripts/serve-check.py --url http://127.0.0.1:8123 --tiny-url http://127.0.0.1:8124 \
      --haystack .gpu/niah --out "$OUT/serve-check.json" > "$OUT/serve-check.txt" 2>&1; echo "serve-check exit $?"; cut -c1-1500 "$OUT/serve-check.txt"
    kill $serve1 $serve2; wait $serve1 $serve2 ;;
esac

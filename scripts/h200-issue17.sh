#!/usr/bin/env bash
# Tensor parallelism over the two-GPU H200 host (issue 17), in calls of the device tool with
# kind nvidia-h200-x2, from the repository root there. NCCL_NVLS_ENABLE=0 is set here and by
# duo itself before NCCL loads.
#   a   carry .gpu/bin (duo.xz), .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k: the
#       tp parity group (both placements against the unsplit reference and one GPU's
#       tokens) and the model group; then Llama-3-8B-shaped random weights, duo 0.5 with the
#       official pattern: a decode step at 1M tokens on one GPU, on two with each placement;
#       the longest contexts (env LONGEST_1, LONGEST_2: tokens of synthetic KV); prefill of
#       PREFILL tokens (default 131072) on one GPU and on two
#   b   carry .gpu/bin, .gpu/patterns/...: a random Llama-3-8B checkpoint on disk, then
#       greedy tokens of full, duo and layer on one GPU and on two (duo generate), compared
set -uo pipefail
step=$1
export NCCL_NVLS_ENABLE=0
source "$(dirname "$0")/h200-common.sh"
nvidia-smi topo -m | head -4 > "$OUT/topo.txt"
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
common="--device cuda --random-weights llama-3-8b --pattern $P --sparsity 0.5 --sink 128 --recent 256 --max-prefill 0 --decode-tokens 10"
case $step in
  a)
    timeout 300 $D cuda-check --only tp,model --no-timings > "$OUT/cuda-check.txt" 2>&1
    echo "cuda-check exit $?: $(grep -c '^ok' "$OUT/cuda-check.txt") ok"; grep -E "^FAIL|tensor parallel|error" "$OUT/cuda-check.txt" | cut -c1-300
    for run in "one:" "aware:--tensor-parallel 2" "contiguous:--tensor-parallel 2 --placement contiguous"; do
      name=${run%%:*}; flags=${run#*:}
      timeout 150 $D bench $common --methods full,duo --lengths 1048576 $flags --out "$OUT/step-$name" > "$OUT/step-$name.txt" 2>&1
      echo "== decode step, $name (exit $?)"; grep -E "tokens:|could not|does not fit|Error|error" "$OUT/step-$name.txt" | cut -c1-200
    done
    timeout 120 $D bench $common --methods duo --lengths ${LONGEST_1:-1900000} --out "$OUT/longest-one" > "$OUT/longest-one.txt" 2>&1
    echo "== longest, one GPU (exit $?)"; grep -E "tokens:|does not fit|rror" "$OUT/longest-one.txt" | cut -c1-200
    timeout 150 $D bench $common --methods duo --lengths ${LONGEST_2:-3800000} --tensor-parallel 2 --out "$OUT/longest-two" > "$OUT/longest-two.txt" 2>&1
    echo "== longest, two GPUs (exit $?)"; grep -E "tokens:|does not fit|rror" "$OUT/longest-two.txt" | cut -c1-200
    for run in "one:" "two:--tensor-parallel 2"; do
      name=${run%%:*}; flags=${run#*:}
      timeout 150 $D bench ${common/--max-prefill 0/--max-prefill ${PREFILL:-131072}} --methods duo --lengths ${PREFILL:-131072} --decode-tokens 3 $flags --out "$OUT/prefill-$name" > "$OUT/prefill-$name.txt" 2>&1
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
esac

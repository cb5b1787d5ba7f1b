#!/usr/bin/env bash
# Issue 18's identification study on the H200: head and layer patterns of the default model
# trained with the streaming window the window study favours (sink 64 + recent 1024 at 8K,
# EVALUATION.md), beside the shipped ones, then the passkey and needle grids with each. Calls
# of the device tool made back to back (the machine stays warm; /tmp/duo carries over):
#   a   carry .gpu/cuda (duo.xz from scripts/build-cuda.sh: the binary whose identification
#       runs on the GPU through candle): unpacks it to /tmp/duo/duo-candle
#   b   carry .gpu/model.part1: leaves it in /tmp/duo
#   c   carry .gpu/model.part2, .gpu/niah: joins the model; identification of both layouts
#       side by side (env STEPS, default 300; SINK, RECENT: 64, 1024), checkpointed every
#       25 steps, for at most RUN_S seconds (default 500); repeat `c` to resume
#   d   carry .gpu/niah: the grids (passkey, needle; 1K-8K, 5 depths) with the new patterns
#       and with the shipped ones at the same window, on the GPU backend
set -uo pipefail
step=$1
mkdir -p /tmp/duo "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
D=/tmp/duo/duo-candle
W="--sink ${SINK:-64} --recent ${RECENT:-1024}"
export DUO_CACHE=/tmp/duo/cache
case $step in
  a) xz -dc .gpu/cuda/duo.xz > $D && chmod +x $D && $D --version ;;
  b) cp .gpu/model.part1 /tmp/duo/model.part1 && ls -la /tmp/duo ;;
  c)
    if [ ! -f $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf ]; then
      cat /tmp/duo/model.part1 .gpu/model.part2 > /tmp/duo/model.gguf
      echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/duo/model.gguf" | sha256sum -c || exit 1
      mkdir -p $DUO_CACHE && cp /tmp/duo/model.gguf $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
      sha256sum $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1 > $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf.sha256
    fi
    for layout in head layer; do
      setsid timeout ${RUN_S:-500} $D identify --device cuda --out /tmp/duo/id-$layout --layout $layout --steps ${STEPS:-300} \
        --min-len 2048 --max-len 8192 $W --checkpoint-every 25 --resume > /tmp/duo/id-$layout.log 2>&1 &
    done
    wait
    for layout in head layer; do tail -c 400 /tmp/duo/id-$layout.log; mkdir -p "$OUT/id-$layout"; cp /tmp/duo/id-$layout/*.tsv /tmp/duo/id-$layout/*.json /tmp/duo/id-$layout/*.png "$OUT/id-$layout/" 2>/dev/null; done
    ls "$OUT"/id-* ;;
  d)
    for task in passkey niah; do
      extra=""; [ $task = niah ] && extra="--haystack .gpu/niah"; [ $task = passkey ] && extra="--words 32"
      for which in trained shipped; do
        pats=""; [ $which = trained ] && pats="--pattern /tmp/duo/id-head --layer-pattern /tmp/duo/id-layer"
        timeout 250 $D eval $task --device cuda $pats $W --sparsity 0.5 --lengths 1000,2000,4000,8000 --depths 0.1,0.3,0.5,0.7,0.9 \
          --methods full,duo,layer $extra --out "$OUT/grid-$which-$task" > "$OUT/grid-$which-$task.txt" 2>&1
        echo "$which $task exit $?"; grep -E "^\| (full|duo|layer) " "$OUT/grid-$which-$task/summary.md" | cut -c1-160
      done
    done ;;
esac

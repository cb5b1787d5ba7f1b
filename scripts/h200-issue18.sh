#!/usr/bin/env bash
# Issue 18's identification study on the H200: head and layer patterns of the default model
# trained with the streaming window the window study favours (sink 64 + recent 1024 at 8K,
# EVALUATION.md), beside the shipped ones, then the passkey and needle grids with each. Calls
# of the device tool made back to back (the machine stays warm; /tmp/duo carries over):
#   a   carry .gpu/cuda (duo.xz from scripts/build-cuda.sh: the binary whose identification
#       runs on the GPU through candle) and .gpu/ma (model.xz.part1: the first 41,500,000
#       bytes of the default model packed by `xz -6`; the 64 MiB a call carries holds the
#       binary, this part and the repository): unpacks the binary to /tmp/duo/duo-candle,
#       leaves the part in /tmp
#   c   carry .gpu/mb (model.xz.part2, the rest of the packed model) and, to continue a run
#       other than the one kept in evaluation/SmolLM2-135M-Instruct-identification-study/,
#       .gpu/id-resume/{head,layer}/state.json: joins the model; identification
#       of both layouts side by side (env STEPS, default 500; SINK, RECENT: 64, 1024),
#       checkpointed every 25 steps, for at most RUN_S seconds (default 500); repeat `c`
#       (carrying nothing) to go on. On the two-GPU host DEV_LAYER=1 gives each layout a GPU
#   t   carry .gpu/mb (as c): where an identification step's time goes: 4 steps at 2K and
#       at 8K for each query block of env BLOCKS (default "gpu 256"; gpu = the device's
#       choice), one layout alone on the GPU, the seconds of each pass
#   p   (after c or t, the model in place) Nsight Compute's per-kernel summary of one
#       identification step at 2K tokens: which of candle's kernels the step's time is in
#   e   carry .gpu/mb, .gpu/niah and .gpu/id-resume (the states to finish): `c` to the end,
#       then with the trained patterns at sink 64 + recent 1024: the passkey and needle grids
#       for all five methods, the RULER-style table (and the shipped patterns' duo and layer
#       rows at the same window), the sparsity sweep at 8K (0.25, 0.75); everything in one
#       archive, $OUT/study.tar.xz (the device tool brings back 8 files at most)
#   d   carry .gpu/niah: the grids (passkey, needle; 1K-8K, 5 depths) with the new patterns
#       and with the shipped ones at the same window, on the GPU backend
set -uo pipefail
step=$1
source "$(dirname "$0")/h200-common.sh"
D=/tmp/duo/duo-candle
W="--sink ${SINK:-64} --recent ${RECENT:-1024}"
export DUO_CACHE=/tmp/duo/cache
case $step in
  a) xz -dc .gpu/cuda/duo.xz > $D && chmod +x $D && $D --version && cp .gpu/ma/model.xz.part1 /tmp/duo/model.ma && ls -la /tmp/duo ;;
  e)
    RUN_S=${RUN_S:-400} bash "$0" c > "$OUT/identify.txt" 2>&1; tail -n 12 "$OUT/identify.txt"
    R=/tmp/duo/study; rm -rf $R; mkdir -p $R; cp -r /tmp/duo/id-head /tmp/duo/id-layer $R/
    pats="--pattern /tmp/duo/id-head --layer-pattern /tmp/duo/id-layer"
    grid="--lengths 1000,2000,4000,8000 --depths 0.1,0.3,0.5,0.7,0.9"
    for task in passkey niah; do
      extra="--haystack .gpu/niah"; [ $task = passkey ] && extra="--words 32"
      timeout 200 $D eval $task --device cuda $pats $W --sparsity 0.5 $grid $extra --out $R/$task > $R/$task.txt 2>&1
      echo "$task exit $?"; grep -E "^\| (full|duo|layer|streaming|random) " $R/$task/summary.md | cut -c1-120
      for sp in 0.25 0.75; do
        timeout 120 $D eval $task --device cuda $pats $W --sparsity $sp --lengths 8000 --depths 0.1,0.3,0.5,0.7,0.9 \
          --methods duo,layer $extra --out $R/$task-$sp > $R/$task-$sp.txt 2>&1
        echo "$task $sp exit $?"; grep -E "^\| (duo|layer) " $R/$task-$sp/summary.md | cut -c1-120
      done
    done
    timeout 240 $D eval ruler --device cuda $pats $W --sparsity 0.5 --lengths 1000,2000,4000,8000 --depths 0.2,0.5,0.8 \
      --haystack .gpu/niah --out $R/ruler > $R/ruler.txt 2>&1; echo "ruler exit $?"
    timeout 120 $D eval ruler --device cuda $W --sparsity 0.5 --lengths 1000,2000,4000,8000 --depths 0.2,0.5,0.8 \
      --methods duo,layer --haystack .gpu/niah --out $R/ruler-shipped > $R/ruler-shipped.txt 2>&1; echo "ruler shipped exit $?"
    tar -C /tmp/duo -cJf "$OUT/study.tar.xz" study; ls -la "$OUT" ;;
  c|t|p)
    join_packed_model
    if [ $step = p ]; then
      timeout 400 ncu --clock-control none --metrics gpu__time_duration.sum --print-summary per-kernel \
        $D identify --device cuda --out /tmp/duo/p --steps 1 --min-len 2048 --max-len 2048 $W > "$OUT/ncu-identify.txt" 2>&1
      echo "ncu exit $?"; grep -E "^  [a-zA-Z_].*\(|gpu__time_duration.sum" "$OUT/ncu-identify.txt" | paste - - | awk '{print $NF, $0}' | sort -rn | head -25 | cut -c1-200
      exit 0
    fi
    if [ $step = t ]; then
      for block in ${BLOCKS:-gpu 256}; do
        flag=""; [ $block = gpu ] || flag="--attention-block $block"
        for len in 2048 8192; do
          timeout 200 $D identify --device cuda --out /tmp/duo/t-$block-$len --steps 4 --min-len $len --max-len $len $W $flag > /dev/null 2>&1
          echo "block $block, $len tokens (exit $?): $(python3 -c "import json; print(json.load(open('/tmp/duo/t-$block-$len/config.json'))['run']['mean_seconds_per_step'])")"
        done
      done
      exit 0
    fi
    for layout in head layer; do
      # Resume from a carried state (.gpu/id-resume), else from the one kept in the repository.
      kept=evaluation/SmolLM2-135M-Instruct-identification-study/$layout-state-step500.json
      if [ ! -f /tmp/duo/id-$layout/state.json ]; then
        mkdir -p /tmp/duo/id-$layout
        if [ -f .gpu/id-resume/$layout/state.json ]; then cp .gpu/id-resume/$layout/state.json /tmp/duo/id-$layout/
        elif [ -f $kept ] && [ "${SINK:-64}/${RECENT:-1024}/${STEPS:-500}" = 64/1024/500 ]; then cp $kept /tmp/duo/id-$layout/state.json; fi
      fi
      dev=cuda; [ $layout = head ] && dev=cuda:${DEV_HEAD:-0}; [ $layout = layer ] && dev=cuda:${DEV_LAYER:-0}
      setsid timeout ${RUN_S:-500} $D identify --device $dev --out /tmp/duo/id-$layout --layout $layout --steps ${STEPS:-500} \
        --min-len 2048 --max-len 8192 $W --checkpoint-every 25 --resume ${ID_FLAGS:-} > /tmp/duo/id-$layout.log 2>&1 &
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

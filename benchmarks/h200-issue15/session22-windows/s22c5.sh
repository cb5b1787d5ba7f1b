#!/usr/bin/env bash
# Session 22, call 5 (b): the passkey and needle grids on SmolLM2 with bf16 windows beside
# int4 and fp8, each beside its cache alone and bf16, in one call.
set -uo pipefail
mkdir -p /tmp/duo "$OUT"
export DUO_KERNEL_CACHE=/tmp/duo/kc DUO_CACHE=/tmp/duo/cache
cat /tmp/duo/m1 /tmp/duo/m2 .gpu/m3/p | xz -dc > /tmp/duo/model.gguf
echo "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53  /tmp/duo/model.gguf" | sha256sum -c || exit 1
mkdir -p $DUO_CACHE && cp /tmp/duo/model.gguf $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf
sha256sum $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf | cut -d' ' -f1 > $DUO_CACHE/SmolLM2-135M-Instruct.Q4_1.gguf.sha256
D=/tmp/duo/duo
trap 'tar -czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/"' EXIT
for v in "int4 bf16" "int4" "bf16" "fp8 bf16" "fp8"; do set -- $v; extra=""; [ $# -eq 2 ] && extra="--kv-dtype-streaming $2"
  name=$1${2:+-$2-windows}
  for task in passkey niah; do
    t=""; [ $task = niah ] && t="--haystack .gpu/niah"; [ $task = passkey ] && t="--words 32"
    timeout 100 $D eval $task --device cuda --kv-dtype $1 $extra --sparsity 0.5 --lengths 1000,2000,4000,8000 --depths 0.1,0.3,0.5,0.7,0.9 \
      --methods full,duo,layer $t --out "$OUT/$name-$task" > "$OUT/$name-$task.txt" 2>&1; echo "$name $task exit $?"; grep -E "^\| (full|duo|layer) " "$OUT/$name-$task/summary.md" | cut -c1-160
  done
done

set -uo pipefail
mkdir -p /tmp/duo "$OUT"
[ -x /tmp/duo/duo ] || { xz -dc .gpu/bin/duo.xz > /tmp/duo/duo && chmod +x /tmp/duo/duo; }
export DUO_KERNEL_CACHE=/tmp/duo/kc
for round in 1 2; do
for v in X=1 DUO_DECODE_MERGE_WIDE=1 DUO_DECODE_MERGE_WIDE=1,DUO_PDL=1 DUO_PDL=1; do
 for kv in bf16 int4; do
  f="$OUT/step-$round-${v//[=,]/_}-$kv.txt"
  timeout 60 env ${v//,/ } /tmp/duo/duo bench --device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --kv-dtype $kv --sparsity 0.5 --methods full,duo,layer --lengths 32768,131072 --max-prefill 0 --decode-tokens 16 > "$f" 2>&1
  echo "== step $round $v $kv exit $?"; grep -E "tokens: " "$f" | sed 's/prefill synthetic KV, //; s/, memory in use.*//;s/decode *//;s/, KV.*//' | tr -s ' ' | paste -sd'|'
 done
done
done
cd "$OUT" && tar czf /tmp/steps.tgz step-* && rm step-* && mv /tmp/steps.tgz .

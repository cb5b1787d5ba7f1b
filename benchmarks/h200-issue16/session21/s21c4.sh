set -uo pipefail
mkdir -p /tmp/duo "$OUT"
[ -x /tmp/duo/duo ] || { xz -dc .gpu/bin/duo.xz > /tmp/duo/duo && chmod +x /tmp/duo/duo; }
export DUO_KERNEL_CACHE=/tmp/duo/kc
for v in X=1 DUO_DECODE_MERGE_WIDE=1; do
 for kv in fp8 k8v4; do
  f="$OUT/step-${v//[=,]/_}-$kv.txt"
  timeout 60 env ${v//,/ } /tmp/duo/duo bench --device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --kv-dtype $kv --sparsity 0.5 --methods full,duo,layer --lengths 32768,131072 --max-prefill 0 --decode-tokens 16 > "$f" 2>&1
  echo "== step $v $kv exit $?"; grep -E "tokens: " "$f" | sed 's/prefill synthetic KV, //; s/, memory in use.*//;s/decode *//;s/, KV.*//' | tr -s ' ' | paste -sd'|'
 done
done
for v in X=1 DUO_DECODE_MERGE_WIDE=1; do
  f="$OUT/step2-${v//[=,]/_}.txt"
  timeout 60 env ${v//,/ } /tmp/duo/duo bench --device cuda --random-weights llama-2-7b --pattern .gpu/patterns/Llama-2-7B-32K-Instruct --kv-dtype bf16 --sparsity 0.5 --methods full,duo,layer --lengths 32768,131072 --max-prefill 0 --decode-tokens 16 > "$f" 2>&1
  echo "== step llama-2 $v exit $?"; grep -E "tokens: " "$f" | sed 's/prefill synthetic KV, //; s/, memory in use.*//;s/decode *//;s/, KV.*//' | tr -s ' ' | paste -sd'|'
done
cd "$OUT" && tar czf /tmp/steps.tgz step* && rm step* && mv /tmp/steps.tgz . ; cd - >/dev/null
timeout 200 env DUO_DECODE_MERGE_WIDE=1 /tmp/duo/duo cuda-check --only model --no-timings > "$OUT/model-parity-wide.txt" 2>&1
echo "model parity exit $?: $(grep -c '^ok' "$OUT/model-parity-wide.txt") ok, $(grep -c '^FAIL' "$OUT/model-parity-wide.txt") failed"; grep "^FAIL" "$OUT/model-parity-wide.txt" | cut -c1-200 | head -5

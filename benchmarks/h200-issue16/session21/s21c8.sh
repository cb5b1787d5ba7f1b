set -uo pipefail
mkdir -p /tmp/duo "$OUT"
xz -dc .gpu/bin/duo.xz > /tmp/duo/duo && chmod +x /tmp/duo/duo
export DUO_KERNEL_CACHE=/tmp/duo/kc
for v in X=1 DUO_MERGE_EARLY=1 X=1 DUO_MERGE_EARLY=1; do
  t0=$SECONDS
  DUO_TIME_KV=bf16 timeout 60 env $v /tmp/duo/duo cuda-check --only ops --timings decode > /tmp/duo/d.txt 2>&1
  echo "== $v (exit $?, $((SECONDS-t0)) s)"; grep -E "Tensor +Bf16" /tmp/duo/d.txt | grep -E " 1 x 131072| 9 x 131072| 1 x 524288|25 x" | sed 's/time decode attention, Llama-3-8B layer, //;s/ per launch//;s/ of KV read//;s/ tokens, Tensor   Bf16//'
  { echo "== $v"; cat /tmp/duo/d.txt; } >> "$OUT/decode.txt"
done
for v in X=1 DUO_MERGE_EARLY=1; do
  f="$OUT/step-${v//[=,]/_}.txt"
  timeout 40 env $v /tmp/duo/duo bench --device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --kv-dtype bf16 --sparsity 0.5 --methods full,duo,layer --lengths 32768,131072 --max-prefill 0 --decode-tokens 16 > "$f" 2>&1
  echo "== step $v exit $?"; grep -E "tokens: " "$f" | sed 's/prefill synthetic KV, //; s/, memory in use.*//;s/decode *//;s/, KV.*//' | tr -s ' ' | paste -sd'|'
done
t0=$SECONDS
timeout 150 env DUO_MERGE_EARLY=1 /tmp/duo/duo cuda-check --only decode --no-timings > "$OUT/parity-early.txt" 2>&1
echo "parity early exit $? in $((SECONDS-t0)) s: $(grep -c '^ok' "$OUT/parity-early.txt") ok, $(grep -c '^FAIL' "$OUT/parity-early.txt") failed"; grep "^FAIL" "$OUT/parity-early.txt" | cut -c1-220 | head -4

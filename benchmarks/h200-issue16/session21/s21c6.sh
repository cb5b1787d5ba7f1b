set -uo pipefail
mkdir -p /tmp/duo "$OUT"
xz -dc .gpu/bin/duo.xz > /tmp/duo/duo && chmod +x /tmp/duo/duo
export DUO_KERNEL_CACHE=/tmp/duo/kc
t0=$SECONDS
timeout 150 /tmp/duo/duo cuda-check --only prefill --no-timings > "$OUT/prefill-parity.txt" 2>&1
echo "prefill parity exit $? in $((SECONDS-t0)) s: $(grep -c '^ok' "$OUT/prefill-parity.txt") ok, $(grep -c '^FAIL' "$OUT/prefill-parity.txt") failed"; grep "^FAIL" "$OUT/prefill-parity.txt" | cut -c1-220 | head -4
for v in X=1 DUO_PREFILL_HEAD_MAJOR=1 X=1 DUO_PREFILL_HEAD_MAJOR=1; do
  t0=$SECONDS
  DUO_TIME_KV=bf16 timeout 90 env $v /tmp/duo/duo cuda-check --only ops --timings prefill > /tmp/duo/p.txt 2>&1
  echo "== $v (exit $?, $((SECONDS-t0)) s)"; grep -E "time prefill" /tmp/duo/p.txt | grep wgmma | sed 's/time prefill attention, Llama-3-8B layer, //;s/ (wgmma kernel)//;s/ (causal retrieval work)//'
  { echo "== $v"; cat /tmp/duo/p.txt; } >> "$OUT/prefill-timings.txt"
done
for v in X=1 DUO_PREFILL_HEAD_MAJOR=1; do
  f="$OUT/prefill128k-${v//[=,]/_}.txt"
  timeout 100 env $v /tmp/duo/duo bench --device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --sparsity 0.5 --methods full,duo --lengths 131072 --decode-tokens 3 > "$f" 2>&1
  echo "== bench $v exit $?"; grep -E "tokens: prefill" "$f" | cut -c1-160
done

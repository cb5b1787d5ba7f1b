set -uo pipefail
mkdir -p /tmp/duo "$OUT"
for b in duo prev; do xz -dc .gpu/bin/$b.xz > /tmp/duo/$b && chmod +x /tmp/duo/$b; done
export DUO_KERNEL_CACHE=/tmp/duo/kc
for cfg in prev:X=1 duo:X=1 duo:DUO_DECODE_MERGE_WIDE=1 duo:DUO_PDL=1 duo:DUO_PDL=2; do
  b=${cfg%%:*}; v=${cfg#*:}; t0=$SECONDS
  timeout 80 env $v /tmp/duo/$b cuda-check --only ops --timings decode > /tmp/duo/d.txt 2>&1
  echo "== decode attention $b $v (exit $?, $((SECONDS-t0)) s)"; grep -E "Tensor +(Bf16|Int4)" /tmp/duo/d.txt | grep -E " 1 x 131072|9 x 131072" | sed 's/time decode attention, Llama-3-8B layer, //;s/ per launch//;s/ of KV read//'
  { echo "== $b $v"; cat /tmp/duo/d.txt; } >> "$OUT/decode.txt"
done
for v in X=1 DUO_PDL=1 DUO_PDL=2; do
  t0=$SECONDS; f="$OUT/step-$v.txt"
  timeout 60 env $v /tmp/duo/duo bench --device cuda --random-weights llama-3-8b --pattern .gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k --kv-dtype bf16 --sparsity 0.5 --methods full,duo,layer --lengths 32768,131072 --max-prefill 0 --decode-tokens 8 > "$f" 2>&1
  echo "== step $v exit $? ($((SECONDS-t0)) s)"; grep -E "tokens: " "$f" | sed 's/prefill synthetic KV, //; s/, memory in use.*//'
done
t0=$SECONDS
timeout 200 env DUO_PDL=2 /tmp/duo/duo cuda-check --only decode --no-timings > "$OUT/parity-pdl2.txt" 2>&1
echo "parity pdl2 exit $? in $((SECONDS-t0)) s: $(grep -c '^ok' "$OUT/parity-pdl2.txt") ok, $(grep -c '^FAIL' "$OUT/parity-pdl2.txt") failed"; grep "^FAIL" "$OUT/parity-pdl2.txt" | cut -c1-220 | head -4

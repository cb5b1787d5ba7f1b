set -uo pipefail
mkdir -p /tmp/duo "$OUT"
for b in duo prev; do xz -dc .gpu/bin/$b.xz > /tmp/duo/$b && chmod +x /tmp/duo/$b; done
export DUO_KERNEL_CACHE=/tmp/duo/kc; rm -rf /tmp/duo/kc
par() { # name vars...
  local n=$1; shift; local t0=$SECONDS
  timeout 200 env "$@" /tmp/duo/duo cuda-check --only decode --no-timings > "$OUT/parity-$n.txt" 2>&1
  echo "parity $n exit $? in $((SECONDS-t0)) s: $(grep -c '^ok' "$OUT/parity-$n.txt") ok, $(grep -c '^FAIL' "$OUT/parity-$n.txt") failed"; grep "^FAIL" "$OUT/parity-$n.txt" | cut -c1-220 | head -4
}
par default X=1
par default-again X=1
par wide DUO_DECODE_MERGE_WIDE=1
par pdl1 DUO_PDL=1
par pdl2 DUO_PDL=2
for cfg in prev:X=1 duo:X=1 duo:DUO_DECODE_MERGE_WIDE=1 duo:DUO_PDL=1 duo:DUO_PDL=2; do
  b=${cfg%%:*}; v=${cfg#*:}; t0=$SECONDS
  timeout 100 env $v /tmp/duo/$b cuda-check --only ops --timings decode > /tmp/duo/d.txt 2>&1
  echo "== decode attention $b $v (exit $?, $((SECONDS-t0)) s)"; grep -E "Tensor +(Bf16|Int4)" /tmp/duo/d.txt | grep -E "131072|x 32768" | sed 's/time decode attention, Llama-3-8B layer, //'
  { echo "== $b $v"; cat /tmp/duo/d.txt; } >> "$OUT/decode.txt"
done

#!/usr/bin/env bash
# Session 28, call 6: the split merge in one pass (each group of head_dim threads keeping its
# own running maximum, one round trip to the partials; the new default) against the listing
# form (DUO_DECODE_MERGE_ONEPASS=0), one binary, the same call, PyTorch's SDPA first; parity
# of the bf16 and fp8 decode cases with it. Carry .gpu/bin and .gpu/patterns.
set -uo pipefail
source scripts/h200-common.sh
trap pack_out EXIT
start=$SECONDS
timeout 120 python3 scripts/torch_decode_attention.py --out "$OUT/decode-attention-torch.json" > "$OUT/decode-attention-torch.txt" 2>&1; echo "torch exit $? ($((SECONDS - start)) s)"; grep "1 x 131072" "$OUT/decode-attention-torch.txt"
for v in 1 0 1 0; do
  f="$OUT/decode-onepass$v-$SECONDS.txt"
  DUO_DECODE_MERGE_ONEPASS=$v timeout 90 $D cuda-check --only ops --timings decode > "$f" 2>&1
  echo "== decode onepass $v exit $? ($((SECONDS - start)) s)"; grep -E "Tensor +(Bf16|Fp8|Int4)" "$f" | grep -E " 1 x 131072| 9 x 131072| 1 x 524288" | sed 's/time decode attention, Llama-3-8B layer, //; s/ per launch//; s/ of KV read//' | cut -c1-100
done
P=.gpu/patterns/Llama-3-8B-Instruct-Gradient-1048k
for round in 1 2; do
  for v in 1 0; do
    f="$OUT/step-onepass$v-$round.txt"
    DUO_DECODE_MERGE_ONEPASS=$v timeout 60 $D bench --device cuda --random-weights llama-3-8b --pattern $P --methods full,duo,layer --sparsity 0.5 --lengths 32768,131072,524288 \
      --max-prefill 0 --decode-tokens 8 > "$f" 2>&1; echo "== step onepass $v round $round exit $? ($((SECONDS - start)) s): $(grep -E "^(full|duo|layer) " "$f" | sed 's/ tokens: prefill synthetic KV, decode//; s/ ms\/token (floor [0-9.]*, / (/; s/), KV .*/)/' | tr -s ' ' | tr '\n' ';')"
  done
done
for kv in Bf16 Fp8; do
  timeout 150 $D cuda-check --only decode --no-timings --cases "paged decode attention $kv," > "$OUT/parity-$kv.txt" 2>&1; echo "parity $kv exit $?: $(grep -c '^ok' "$OUT/parity-$kv.txt") ok, $(grep -c '^FAIL' "$OUT/parity-$kv.txt") FAIL ($((SECONDS - start)) s)"; grep -E "^FAIL|^error" "$OUT/parity-$kv.txt" | cut -c1-220 | head -5
done
tar -C "$DUO_KERNEL_CACHE" -cf - . | xz -T8 -6 > "$OUT/kc-host.tar.xz"
echo "total $((SECONDS - start)) s"

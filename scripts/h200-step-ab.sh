#!/usr/bin/env bash
# A kernel change against the binary before it (issue 16), side by side in one call of the
# device tool from the repository root on the GPU host; carry .gpu/bin (duo.xz: this build,
# prev.xz: the one to compare with) and .gpu/patterns. Results go straight to $OUT, so a call
# cut short still brings back what it did:
#   1. this build's decode parity group (and, last, the whole model's parity), with env
#      NEW_VARS' settings (comma-separated NAME=VALUE) as everything else of this build;
#   2. a whole decode step (random weights, synthetic KV) of Llama-3-8B and Llama-2-7B with
#      their official patterns at 32K and 128K tokens, full, duo 0.5 and layer 0.5, by each
#      binary in turn, for each cache type in env KVS (default bf16; e.g. "bf16 int4") (env PREV_VARS: the previous binary's settings, e.g. its best knobs;
#      the same binary as both, with knobs in NEW_VARS, compares settings);
#   3. the decode-attention kernel timings (`cuda-check --only ops --timings decode`) by each,
#      after (TORCH=1) PyTorch SDPA's decode attention on the same shapes, the peer in the call.
set -uo pipefail
mkdir -p /tmp/duo "$OUT"
# The device tool brings back at most 8 files: more (KVS beyond bf16) leave as one archive.
trap '[ "$(ls "$OUT" | wc -l)" -gt 8 ] && tar -czf /tmp/results.tgz -C "$OUT" . && rm -rf "${OUT:?}"/* && mv /tmp/results.tgz "$OUT/"' EXIT
for b in duo prev; do xz -dc .gpu/bin/$b.xz > /tmp/duo/$b && chmod +x /tmp/duo/$b; done
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
new_vars=${NEW_VARS:-}; new_vars=${new_vars//,/ }; prev_vars=${PREV_VARS:-}; prev_vars=${prev_vars//,/ }
echo "new: $new_vars; prev: $prev_vars"
timeout 200 env $new_vars /tmp/duo/duo cuda-check --only decode --no-timings > "$OUT/decode-parity.txt" 2>&1
echo "decode parity exit $?: $(grep -c '^ok' "$OUT/decode-parity.txt") ok, $(grep -c '^FAIL' "$OUT/decode-parity.txt") failed"; grep "^FAIL" "$OUT/decode-parity.txt" | cut -c1-200 | head -5
for shape in llama-3-8b:Llama-3-8B-Instruct-Gradient-1048k llama-2-7b:Llama-2-7B-32K-Instruct; do
  for b in prev duo; do
    vars=$new_vars; [ $b = prev ] && vars=$prev_vars
    for kv in ${KVS:-bf16}; do
      f="$OUT/step-${shape%%:*}-$b.txt"; [ "$kv" = bf16 ] || f="$OUT/step-${shape%%:*}-$kv-$b.txt"
      timeout 90 env $vars /tmp/duo/$b bench --device cuda --random-weights ${shape%%:*} --pattern .gpu/patterns/${shape#*:} --kv-dtype $kv --sparsity 0.5 --methods full,duo,layer --lengths 32768,131072 --max-prefill 0 --decode-tokens 8 > "$f" 2>&1
      echo "== ${shape%%:*} $kv $b ($vars) exit $?"; grep -E "tokens: " "$f" | sed 's/prefill synthetic KV, //; s/, memory in use.*//'
    done
  done
done
# All of step 3 in one file (the device tool brings back at most 8).
if [ "${TORCH:-0}" = 1 ]; then
  echo "== torch" >> "$OUT/decode.txt"
  timeout 120 python3 scripts/torch_decode_attention.py --out /tmp/duo/decode-attention-torch.json >> "$OUT/decode.txt" 2>&1
  grep -E "copy bandwidth|torch sdpa" "$OUT/decode.txt" | sed 's/decode attention, Llama-3-8B layer, //'
fi
for b in prev duo; do
  vars=$new_vars; [ $b = prev ] && vars=$prev_vars
  timeout 120 env $vars /tmp/duo/$b cuda-check --only ops --timings decode > /tmp/duo/decode-$b.txt 2>&1
  echo "== decode attention $b (exit $?)"; grep -E "${ROWS:-Tensor +Bf16}" /tmp/duo/decode-$b.txt | sed 's/time decode attention, Llama-3-8B layer, //'
  { echo "== $b ($vars)"; cat /tmp/duo/decode-$b.txt; } >> "$OUT/decode.txt"
done
# The whole model's parity last (the longest step; a call cut short keeps the rest).
timeout ${MODEL_TIMEOUT:-200} env $new_vars /tmp/duo/duo cuda-check --only model --no-timings > "$OUT/model-parity.txt" 2>&1
echo "model parity exit $?: $(grep -c '^ok' "$OUT/model-parity.txt") ok, $(grep -c '^FAIL' "$OUT/model-parity.txt") failed"; grep "^FAIL" "$OUT/model-parity.txt" | cut -c1-200 | head -5

#!/usr/bin/env bash
# Session 23, call 1: bf16 windows beside a k8v4 cache (streaming key rows spaced out,
# PagedArgs::key_shift): the parity cases that cover it, then a regression subset of the
# kernels the change touched (bf16 decode, int4 with bf16 windows, a bf16 whole model).
# The session had 240 s of device time, so parity only; no model file travels.
set -uo pipefail
mkdir -p /tmp/duo "$OUT"
export DUO_KERNEL_CACHE=/tmp/duo/kc
xz -dc .gpu/bin/duo.xz > /tmp/duo/duo && chmod +x /tmp/duo/duo
D=/tmp/duo/duo
run() {  # name, seconds, groups, cases
  local t0=$SECONDS
  timeout "$2" $D cuda-check --only "$3" --cases "$4" --no-timings > "$OUT/$1.txt" 2>&1
  echo "$1 exit $? in $((SECONDS - t0)) s: $(grep -c '^ok' "$OUT/$1.txt") ok, $(grep -c '^FAIL' "$OUT/$1.txt") failed"
  grep -E "^FAIL|^ok|rror" "$OUT/$1.txt" | cut -c1-230
}
run k8v4-windows 110 model,decode 'K8V4 with bf16 windows|K8V4 cache, bf16 windows'
run regression 80 decode,model 'paged decode attention Bf16, |Int4 with bf16 windows|whole model GQA |whole model GQA, int4 cache, bf16 windows'

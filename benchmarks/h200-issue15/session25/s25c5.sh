#!/usr/bin/env bash
# Session 25, call 5: the model's first third to /tmp; the bf16 decode kernel with bulk tensor
# copies (DUO_DECODE_TMA=1): decode parity, timings beside the shipped kernel and PyTorch SDPA
# in the same call, Nsight Compute's DRAM throughput of its partial kernel.
set -uo pipefail
mkdir -p /tmp/duo && cp .gpu/m1/p /tmp/duo/m1
PARITY_VARS=DUO_DECODE_TMA=1 VARIANTS=DUO_DECODE_TMA=1 TORCH=1 NCU=1 NCU_VARS=DUO_DECODE_TMA=1 bash scripts/h200-decode-lab.sh

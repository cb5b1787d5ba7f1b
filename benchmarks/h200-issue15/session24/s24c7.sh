#!/usr/bin/env bash
# Session 24, call 7: the kernels of PyTorch's SDPA decode attention at 1 x 128K under Nsight
# Compute (names, grids, durations), beside which duo's partial + merge pair takes 0.139 ms.
set -uo pipefail
mkdir -p "$OUT"
timeout 150 ncu --clock-control none --csv --metrics gpu__time_duration.sum,launch__grid_size,launch__block_size,launch__registers_per_thread python3 benchmarks/h200-issue15/session24/sdpa_kernels.py > "$OUT/sdpa-ncu.csv" 2> "$OUT/sdpa-ncu.err"
echo "ncu exit $?"
python3 - "$OUT/sdpa-ncu.csv" <<'PY'
import csv, sys, collections
rows = [r for r in csv.reader(open(sys.argv[1])) if len(r) > 10]
h = rows[0]; rows = rows[1:]
ki, mi, vi, ui = h.index("Kernel Name"), h.index("Metric Name"), h.index("Metric Value"), h.index("Metric Unit")
by = collections.defaultdict(dict)
for r in rows:
    by[(r[0], r[ki][:110])][r[mi]] = (r[vi], r[ui])
for (i, name), m in sorted(by.items(), key=lambda x: int(x[0][0])):
    print(i, name, {k: v for k, v in m.items()})
PY

"""Sums the kernel durations of an Nsight Compute CSV (`ncu --csv --metrics
gpu__time_duration.sum`) per kernel name and grid, largest first, so that a whole run's GPU time
can be set against its wall time (scripts/h200-prefill-timeline.sh)."""
import csv
import sys
from collections import defaultdict

SCALE = {"nsecond": 1e-6, "ns": 1e-6, "usecond": 1e-3, "us": 1e-3, "msecond": 1.0, "ms": 1.0, "second": 1e3, "s": 1e3}


def main(path):
    rows = []
    with open(path, newline="") as f:
        lines = [line for line in f if line.startswith('"')]
    for r in csv.DictReader(lines):
        if r.get("Metric Name") != "gpu__time_duration.sum":
            continue
        ms = float(r["Metric Value"].replace(",", "")) * SCALE[r["Metric Unit"]]
        rows.append((r["Kernel Name"].split("(")[0], r["Grid Size"], ms))
    total = defaultdict(float)
    count = defaultdict(int)
    for name, grid, ms in rows:
        total[(name, grid)] += ms
        count[(name, grid)] += 1
    by_name = defaultdict(float)
    for (name, _), ms in total.items():
        by_name[name] += ms
    print(f"{len(rows)} launches, {sum(total.values()):.1f} ms of kernels")
    for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1]):
        print(f"  {ms:10.1f} ms  {name}")
    print("per kernel and grid:")
    for (name, grid), ms in sorted(total.items(), key=lambda kv: -kv[1])[:40]:
        print(f"  {ms:10.1f} ms  {count[(name, grid)]:6d} x {ms / count[(name, grid)] * 1e3:9.1f} us  {name} {grid}")


if __name__ == "__main__":
    main(sys.argv[1])

#!/usr/bin/env python3
"""Per-length comparison tables of `duo eval` results for EVALUATION.md: the teacher-forced
mean over the depths of each (method, length) for a baseline and the runs compared with it,
the all-cells mean, and each compared run's largest gap below the baseline over the lengths.

  python3 scripts/eval-compare.py BASELINE_DIR RUN_DIR [RUN_DIR ...]

Each DIR holds a `results.jsonl` written by `duo eval`; rows print as
`| method | b / r1 / r2 | ... | all cells | largest gap r1 / r2 |` (the baseline first). A
cell present in the baseline but not in a run is an error: the runs must cover the same
grid.
"""
import collections
import json
import sys

METHODS = ["full", "duo", "layer", "streaming", "random"]


def load(folder):
    rows = [json.loads(line) for line in open(f"{folder}/results.jsonl") if line.strip()]
    by_cell = collections.defaultdict(list)
    for r in rows:
        by_cell[(r["method"], r["length"])].append(r["teacher_forced"])
    return {k: sum(v) / len(v) for k, v in by_cell.items()}, rows


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    runs = [load(folder) for folder in argv[1:]]
    base, _ = runs[0]
    lengths = sorted({length for _, length in base})
    print("| method | " + " | ".join(f"{l:,}" for l in lengths) + " | all cells | largest gap |")
    print("|---|" + "---|" * (len(lengths) + 2))
    for m in METHODS:
        if (m, lengths[0]) not in base:
            continue
        cells, gaps = [], [0.0] * (len(runs) - 1)
        for length in lengths:
            means = []
            for i, (by_cell, _) in enumerate(runs):
                if (m, length) not in by_cell:
                    sys.exit(f"{argv[1 + i]}: no {m} cell at {length} tokens")
                means.append(by_cell[(m, length)])
                if i > 0:
                    gaps[i - 1] = max(gaps[i - 1], base[(m, length)] - by_cell[(m, length)])
            cells.append(" / ".join(f"{v:.3f}" for v in means))
        alls = []
        for _, rows in runs:
            mine = [r["teacher_forced"] for r in rows if r["method"] == m]
            alls.append(sum(mine) / len(mine))
        print(f"| {m} | " + " | ".join(cells) + " | " + " / ".join(f"{v:.3f}" for v in alls) + " | " + " / ".join(f"{g:.3f}" for g in gaps) + " |")


if __name__ == "__main__":
    main(sys.argv)

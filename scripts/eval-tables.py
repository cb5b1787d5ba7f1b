#!/usr/bin/env python3
"""Markdown tables for EVALUATION.md from `duo eval` results (results.jsonl):
mean teacher-forced and generation scores per method and context length, cells counted."""
import collections, json, sys

METHODS = ["full", "duo", "layer", "streaming", "random"]
for path in sys.argv[1:]:
    rows = [json.loads(l) for l in open(path) if l.strip()]
    lengths = sorted({r["length"] for r in rows})
    agg = collections.defaultdict(list)
    for r in rows:
        agg[(r["method"], r["length"])].append(r)
    print(f"\n{path}: {len(rows)} cells\n")
    print("| method | KV MiB at " + " / ".join(map(str, lengths)) + " | " + " | ".join(f"{l}: teacher-forced / generation" for l in lengths) + " | all cells |")
    print("|---|---|" + "---|" * len(lengths) + "---|")
    for m in METHODS:
        cells, kv = [], []
        for l in lengths:
            rs = agg.get((m, l), [])
            kv.append(f"{max(r['kv_bytes'] for r in rs) / 2**20:.0f}" if rs else "-")
            if rs:
                tf = sum(r["teacher_forced"] for r in rs) / len(rs)
                g = sum(r["generation"] for r in rs) / len(rs)
                cells.append(f"{tf:.2f} / {g:.2f}" + ("" if len(rs) == 5 else f" ({len(rs)} cells)"))
            else:
                cells.append("-")
        allr = [r for r in rows if r["method"] == m]
        tot = f"{sum(r['teacher_forced'] for r in allr) / len(allr):.3f} / {sum(r['generation'] for r in allr) / len(allr):.3f}" if allr else "-"
        print(f"| {m} | {' / '.join(kv)} | " + " | ".join(cells) + f" | {tot} |")

#!/usr/bin/env python3
"""Load benchmark of `duo serve`: N long streamed requests sent at once to a server per
method, all servers with the same KV budget; reports how many requests each admitted at
once, throughput and latency percentiles (TTFT, inter-token, end-to-end).

Needs httpx (the test suite's venv has it: target/tmp/openai-venv/bin/python).

  python3 scripts/serve-bench.py --duo target/release/duo --methods full,duo \
      --kv-budget-mib 220 --requests 8 --prompt-tokens 2000 --max-tokens 32 \
      --haystack ../shared/reference/niah-haystack-paul-graham --out benchmarks/serve-smollm2
"""

import argparse
import csv
import json
import os
import platform
import re
import subprocess
import threading
import time

import httpx


def start(duo, method, budget, extra):
    cmd = [duo, "serve", "--port", "0", "--method", method, "--kv-budget-mib", str(budget), "--max-running", "64"] + extra
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = None
    for line in p.stderr:
        m = re.search(r"listening on (\S+)", line)
        if m:
            url = m.group(1)
            break
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    while httpx.get(url + "/health").status_code != 200:
        time.sleep(0.1)
    return p, url, " ".join(cmd)


def metric(text, name, label=None):
    for line in text.splitlines():
        if line.startswith(name + "{") and (label is None or label in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def one(url, prompt, max_tokens, out):
    t0 = time.perf_counter()
    times = []
    with httpx.stream("POST", url + "/v1/completions", timeout=3600,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "logprobs": 0}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("logprobs"):
                    times.append(time.perf_counter())
    out.append({"ttft": times[0] - t0, "e2e": times[-1] - t0, "tokens": len(times),
                "itl": [b - a for a, b in zip(times, times[1:])]})


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duo", default="target/release/duo")
    ap.add_argument("--methods", default="full,duo")
    ap.add_argument("--kv-budget-mib", type=float, default=220)
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--haystack", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--extra", default="", help="more duo serve flags")
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    files = sorted(f for f in os.listdir(a.haystack) if f.endswith(".txt"))
    text = "\n\n".join(open(os.path.join(a.haystack, f)).read() for f in files)
    rows = []
    for method in a.methods.split(","):
        p, url, cmd = start(a.duo, method, a.kv_budget_mib, a.extra.split())
        try:
            tok = httpx.post(url + "/tokenize", json={"prompt": text[:400000]}).json()["tokens"]
            prompts = [tok[i * 997: i * 997 + a.prompt_tokens] for i in range(a.requests)]
            results, peak_running, peak_kv, done = [], 0, 0, False

            def watch():
                nonlocal peak_running, peak_kv
                while not done:
                    m = httpx.get(url + "/metrics").text
                    peak_running = max(peak_running, metric(m, "vllm:num_requests_running"))
                    peak_kv = max(peak_kv, metric(m, "duo:kv_cache_bytes", "retrieval") + metric(m, "duo:kv_cache_bytes", "streaming"))
                    time.sleep(0.1)

            w = threading.Thread(target=watch)
            w.start()
            t0 = time.perf_counter()
            threads = [threading.Thread(target=one, args=(url, pr, a.max_tokens, results)) for pr in prompts]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            done = True
            w.join()
            m = httpx.get(url + "/metrics").text
            itl = [x for r in results for x in r["itl"]]
            gen = sum(r["tokens"] for r in results)
            rows.append({
                "method": method, "kv_budget_mib": a.kv_budget_mib, "requests": a.requests, "prompt_tokens": a.prompt_tokens,
                "max_tokens": a.max_tokens,
                "peak_running": int(peak_running), "peak_kv_mib": round(peak_kv / 2**20, 1), "wall_s": round(wall, 1),
                "output_tok_per_s": round(gen / wall, 2), "total_tok_per_s": round((gen + a.prompt_tokens * a.requests) / wall, 1),
                "ttft_p50_s": round(pct([r["ttft"] for r in results], 50), 2), "ttft_p90_s": round(pct([r["ttft"] for r in results], 90), 2),
                "itl_p50_ms": round(1000 * pct(itl, 50), 1), "itl_p90_ms": round(1000 * pct(itl, 90), 1), "itl_p99_ms": round(1000 * pct(itl, 99), 1),
                "e2e_p50_s": round(pct([r["e2e"] for r in results], 50), 1), "e2e_p90_s": round(pct([r["e2e"] for r in results], 90), 1),
                "decode_steps": int(metric(m, "duo:decode_steps_total")), "generated": gen, "command": cmd,
            })
            print(json.dumps(rows[-1]), flush=True)
        finally:
            p.terminate()
            p.wait()
    with open(os.path.join(a.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["method", "peak_running", "peak_kv_mib", "wall_s", "output_tok_per_s", "total_tok_per_s", "ttft_p50_s", "ttft_p90_s",
            "itl_p50_ms", "itl_p90_ms", "itl_p99_ms", "e2e_p50_s", "e2e_p90_s", "decode_steps"]
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(f"{a.requests} streamed requests of {a.prompt_tokens} prompt tokens + {a.max_tokens} greedy tokens, sent at once; "
                f"KV budget {a.kv_budget_mib} MiB per server; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                f"{time.strftime('%Y-%m-%d')}.\n\n")
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r[c]) for c in cols) + " |\n")
        f.write("\nCommands: " + "; ".join(f"`{r['command']}`" for r in rows) + "\n")


if __name__ == "__main__":
    main()

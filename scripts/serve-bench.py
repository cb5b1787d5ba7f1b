#!/usr/bin/env python3
"""Load benchmark of `duo serve`: N long streamed requests sent at once to a server per
method, all servers with the same memory (CPU: the same KV budget; GPU: the same
--gpu-memory-utilization); reports how many sequences ran at once, KV in use, preemptions,
output throughput and latency percentiles (TTFT, inter-token, end-to-end).

Prompts are haystack text (--haystack) or seeded random token ids (--random-prompts, for
random-weight checkpoints); `ignore_eos` makes every request generate --max-tokens tokens.
Methods: full, duo, layer (duo with --layout layer), streaming; --serve-args go to every server.
Needs httpx (the test suite's venv has it: target/tmp/openai-venv/bin/python).

  python3 scripts/serve-bench.py --duo target/release/duo --methods full,duo \
      --kv-budget-mib 220 --requests 8 --prompt-tokens 2000 --max-tokens 32 \
      --haystack ../shared/reference/niah-haystack-paul-graham --out benchmarks/serve-smollm2
  python3 scripts/serve-bench.py --duo /tmp/duo/duo --methods full,duo,layer --random-prompts 1000 \
      --serve-args "--device cuda --model /tmp/l3 --pattern P --gpu-memory-utilization 0.35" \
      --requests 64 --prompt-tokens 32768 --max-tokens 1024 --out benchmarks/h200-serve
"""

import argparse
import csv
import json
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time

import httpx


def method_flags(method):
    if method == "layer":
        return ["--method", "duo", "--layout", "layer"]
    return ["--method", method]


def start(duo, method, budget, extra):
    cmd = [duo, "serve", "--port", "0"] + method_flags(method) + extra
    if budget:
        cmd += ["--kv-budget-mib", str(budget), "--max-running", "64"]
    p = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    url = None
    for line in p.stderr:
        m = re.search(r"listening on (\S+)", line)
        if m:
            url = m.group(1)
            break
    threading.Thread(target=lambda: [None for _ in p.stderr], daemon=True).start()
    while httpx.get(url + "/health").status_code != 200:
        if p.poll() is not None:
            raise SystemExit(f"the server exited: {' '.join(cmd)}")
        time.sleep(0.1)
    return p, url, " ".join(cmd)


def metric(text, name, label=None):
    for line in text.splitlines():
        if line.startswith(name + "{") and (label is None or label in line):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


FIRSTS = [0]


def one(url, prompt, max_tokens, out):
    t0 = time.perf_counter()
    times = []
    with httpx.stream("POST", url + "/v1/completions", timeout=3600,
                      json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True, "logprobs": 0, "ignore_eos": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunk = json.loads(line[6:])
                if chunk["choices"] and chunk["choices"][0].get("logprobs"):
                    times.append(time.perf_counter())
                    if len(times) == 1:
                        FIRSTS[0] += 1
    out.append({"ttft": times[0] - t0, "e2e": times[-1] - t0, "tokens": len(times),
                "itl": [b - a for a, b in zip(times, times[1:])]})


PHASES = ["duo:request_queue_time_seconds_sum", "duo:request_prefill_time_seconds_sum",
          "duo:prefill_steps_total", "duo:prefill_steps_seconds_total", "duo:decode_steps_total",
          "vllm:time_to_first_token_seconds_sum"]


def probe_ttft(url, prompt):
    """Time to first token of one streamed request, measured in a separate Python process so
    that the benchmark's own streaming threads (and their GIL) do not delay it; also the
    server's own count of running requests when it arrived, and how the server's counters
    moved meanwhile (its queue and prefill time, and the steps that ran: nobody else is
    admitted or prefilled while every other request decodes)."""
    # The client is made before the clock starts: making one loads its TLS certificates
    # (17-20 ms on the 2-core build machine, more on the GPU host), which earlier probe
    # figures counted as time to first token.
    code = ("import httpx, json, sys, time\n"
            "url, prompt = sys.argv[1], json.loads(sys.stdin.read())\n"
            "client = httpx.Client(timeout=3600)\n"
            "t0 = time.perf_counter()\n"
            "with client.stream('POST', url + '/v1/completions', json={'prompt': prompt, 'max_tokens': 2, 'temperature': 0, 'stream': True, 'ignore_eos': True}) as r:\n"
            "    if r.status_code != 200:\n"
            "        sys.exit(f'the probe was refused ({r.status_code}): {r.read().decode()} (is --vocab the model\\'s?)')\n"
            "    for line in r.iter_lines():\n"
            "        if line.startswith('data: ') and line != 'data: [DONE]' and json.loads(line[6:])['choices']:\n"
            "            print(time.perf_counter() - t0); break\n")
    before = httpx.get(url + "/metrics").text
    running = metric(before, "vllm:num_requests_running")
    out = subprocess.run([sys.executable, "-c", code, url], input=json.dumps(prompt), capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(out.stderr.strip())
    after = httpx.get(url + "/metrics").text
    moved = {name: metric(after, name) - metric(before, name) for name in PHASES}
    return float(out.stdout.strip()), int(running), moved


def pct(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--duo", default="target/release/duo")
    ap.add_argument("--methods", default="full,duo")
    ap.add_argument("--kv-budget-mib", type=float, default=0, help="CPU servers: the KV budget (GPU servers size their pool)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--haystack")
    ap.add_argument("--random-prompts", type=int, default=0, help="seeded random token ids from this id up (random-weight models)")
    ap.add_argument("--vocab", type=int, default=128000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--probe-tokens", type=int, default=0, help="a probe request of this many tokens sent once every request decodes")
    ap.add_argument("--serve-args", default="", help="more duo serve flags, for every method")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    os.makedirs(a.out, exist_ok=True)
    text = ""
    if a.haystack:
        files = sorted(f for f in os.listdir(a.haystack) if f.endswith(".txt"))
        text = "\n\n".join(open(os.path.join(a.haystack, f)).read() for f in files)
    rows = []
    for method in a.methods.split(","):
        p, url, cmd = start(a.duo, method, a.kv_budget_mib, a.serve_args.split())
        try:
            if a.random_prompts:
                rng = random.Random(a.seed)
                prompts = [[rng.randrange(a.random_prompts, a.vocab) for _ in range(a.prompt_tokens)] for _ in range(a.requests)]
            else:
                tok = httpx.post(url + "/tokenize", json={"prompt": text[:400000]}).json()["tokens"]
                prompts = [tok[i * 997: i * 997 + a.prompt_tokens] for i in range(a.requests)]
            results, peak_running, peak_kv, peak_blocks, done = [], 0, 0, 0, False

            def watch():
                nonlocal peak_running, peak_kv, peak_blocks
                while not done:
                    m = httpx.get(url + "/metrics").text
                    peak_running = max(peak_running, metric(m, "vllm:num_requests_running"))
                    peak_kv = max(peak_kv, metric(m, "duo:kv_cache_bytes", "retrieval") + metric(m, "duo:kv_cache_bytes", "streaming"))
                    peak_blocks = max(peak_blocks, metric(m, "duo:kv_blocks_used"))
                    time.sleep(0.1)

            w = threading.Thread(target=watch)
            w.start()
            t0 = time.perf_counter()
            FIRSTS[0] = 0
            threads = [threading.Thread(target=one, args=(url, pr, a.max_tokens, results)) for pr in prompts]
            for t in threads:
                t.start()
            # A probe arriving while every request decodes: its TTFT against the same probe on
            # the idle server afterwards (its prefill alone).
            probe_rng = random.Random(a.seed + 1)
            probe = [probe_rng.randrange(a.random_prompts or 1000, a.vocab) for _ in range(a.probe_tokens)]
            busy = None
            while FIRSTS[0] < a.requests and any(t.is_alive() for t in threads):
                time.sleep(0.05)
            if a.probe_tokens:
                busy = probe_ttft(url, probe)
            for t in threads:
                t.join()
            wall = time.perf_counter() - t0
            done = True
            w.join()
            idle = None
            if a.probe_tokens:
                idle = probe_ttft(url, probe)
            m = httpx.get(url + "/metrics").text
            peak_running = max(peak_running, metric(m, "duo:num_requests_running_peak"))
            weights, bandwidth = metric(m, "duo:weight_bytes"), metric(m, "duo:copy_bandwidth_bytes_per_second")
            wide_rows, wide_s, wide_kv = metric(m, "duo:widest_decode_step_rows"), metric(m, "duo:widest_decode_step_seconds"), metric(m, "duo:widest_decode_step_kv_bytes")
            dec_rows, dec_s = metric(m, "duo:decode_only_rows_total"), metric(m, "duo:decode_only_seconds_total")
            fw_steps, fw_rows, fw_s = metric(m, "duo:full_width_decode_steps"), metric(m, "duo:full_width_decode_rows"), metric(m, "duo:full_width_decode_seconds")
            floor_s = (weights + wide_kv) / bandwidth if bandwidth else 0.0
            itl = [x for r in results for x in r["itl"]]
            gen = sum(r["tokens"] for r in results)
            rows.append({
                "method": method, "kv_budget_mib": a.kv_budget_mib, "requests": a.requests, "prompt_tokens": a.prompt_tokens,
                "max_tokens": a.max_tokens,
                "peak_running": int(peak_running), "peak_kv_mib": round(peak_kv / 2**20, 1), "wall_s": round(wall, 1),
                "pool_blocks": int(metric(m, "duo:kv_blocks_total")), "peak_blocks_used": int(peak_blocks),
                "preemptions": int(metric(m, "vllm:num_preemptions_total")),
                "output_tok_per_s": round(gen / wall, 2), "total_tok_per_s": round((gen + a.prompt_tokens * a.requests) / wall, 1),
                "ttft_p50_s": round(pct([r["ttft"] for r in results], 50), 2), "ttft_p90_s": round(pct([r["ttft"] for r in results], 90), 2),
                "ttft_p99_s": round(pct([r["ttft"] for r in results], 99), 2),
                "itl_p50_ms": round(1000 * pct(itl, 50), 1), "itl_p90_ms": round(1000 * pct(itl, 90), 1), "itl_p99_ms": round(1000 * pct(itl, 99), 1),
                "e2e_p50_s": round(pct([r["e2e"] for r in results], 50), 1), "e2e_p90_s": round(pct([r["e2e"] for r in results], 90), 1),
                "decode_steps": int(metric(m, "duo:decode_steps_total")), "generated": gen,
                # Decode throughput with the batch full: every running sequence gains a token per step.
                "decode_tok_per_s_full_batch": round(peak_running / pct(itl, 50), 1),
                "decode_only_tok_per_s": round(dec_rows / dec_s, 1) if dec_s else 0,
                # Decode-only steps with the batch full (as many rows as the widest step), averaged.
                "full_batch_steps": int(fw_steps), "full_batch_decode_tok_per_s": round(fw_steps * fw_rows / fw_s, 1) if fw_s else 0,
                "widest_step_rows": int(wide_rows), "widest_step_ms": round(1000 * wide_s, 2), "widest_step_floor_ms": round(1000 * floor_s, 2),
                "widest_step_over_floor": round(wide_s / floor_s, 2) if floor_s else 0,
                "probe_tokens": a.probe_tokens, "probe_ttft_busy_s": round(busy[0], 3) if busy else 0,
                "probe_running_when_sent": busy[1] if busy else 0,
                # Where the busy probe's time went: its queue and prefill time as the server
                # counted them, and the steps with a prefill chunk that ran until its first
                # token arrived (the decode-only steps of the others run in between).
                "probe_busy_queue_s": round(busy[2]["duo:request_queue_time_seconds_sum"], 4) if busy else 0,
                "probe_busy_prefill_s": round(busy[2]["duo:request_prefill_time_seconds_sum"], 4) if busy else 0,
                "probe_busy_prefill_steps": int(busy[2]["duo:prefill_steps_total"]) if busy else 0,
                "probe_busy_prefill_step_s": round(busy[2]["duo:prefill_steps_seconds_total"], 4) if busy else 0,
                "probe_busy_decode_steps": int(busy[2]["duo:decode_steps_total"]) if busy else 0,
                # The server's own time to first token (request read to first token sent):
                # what the client's figure adds beyond it is transport and client.
                "probe_busy_server_ttft_s": round(busy[2]["vllm:time_to_first_token_seconds_sum"], 4) if busy else 0,
                "probe_idle_server_ttft_s": round(idle[2]["vllm:time_to_first_token_seconds_sum"], 4) if idle else 0,
                "probe_idle_prefill_s": round(idle[2]["duo:request_prefill_time_seconds_sum"], 4) if idle else 0,
                "probe_ttft_idle_s": round(idle[0], 3) if idle else 0, "command": cmd,
            })
            print(json.dumps(rows[-1]), flush=True)
        finally:
            p.terminate()
            p.wait()
    with open(os.path.join(a.out, "results.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    cols = ["method", "peak_running", "peak_kv_mib", "pool_blocks", "peak_blocks_used", "preemptions", "wall_s", "output_tok_per_s",
            "total_tok_per_s", "ttft_p50_s", "ttft_p99_s", "itl_p50_ms", "itl_p99_ms", "decode_only_tok_per_s", "full_batch_decode_tok_per_s", "full_batch_steps", "widest_step_rows", "widest_step_ms", "widest_step_floor_ms",
            "widest_step_over_floor", "probe_ttft_busy_s", "probe_busy_server_ttft_s", "probe_busy_queue_s", "probe_busy_prefill_s", "probe_busy_prefill_steps", "probe_busy_prefill_step_s", "probe_ttft_idle_s", "probe_idle_server_ttft_s", "probe_idle_prefill_s", "e2e_p50_s", "decode_steps"]
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(f"{a.requests} streamed requests of {a.prompt_tokens} prompt tokens + {a.max_tokens} greedy tokens, sent at once; "
                f"server flags `{a.serve_args}`, KV budget {a.kv_budget_mib or 'pool'} MiB; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
                f"{time.strftime('%Y-%m-%d')}.\n\n")
        f.write("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols) + "\n")
        for r in rows:
            f.write("| " + " | ".join(str(r[c]) for c in cols) + " |\n")
        f.write("\nCommands: " + "; ".join(f"`{r['command']}`" for r in rows) + "\n")


if __name__ == "__main__":
    main()

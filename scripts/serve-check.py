#!/usr/bin/env python3
"""Correctness of `duo serve` under load (issue 14's checks), against running servers:

1. 32 greedy requests of mixed prompt lengths (seeded, 100-6000 tokens from the haystack)
   sent at once produce exactly the text each produces when sent alone.
2. The same prompts against a second server with a tiny KV pool (--num-gpu-blocks-override):
   sequences are preempted and recomputed, and still produce the same text.
3. A client that disconnects mid-stream frees its blocks: running and KV blocks return to 0.

Needs httpx. Prints one JSON summary and exits non-zero when a check fails.

  python3 scripts/serve-check.py --url http://127.0.0.1:8123 --tiny-url http://127.0.0.1:8124 \
      --haystack ../shared/reference/niah-haystack-paul-graham --out check.json
"""

import argparse
import json
import os
import random
import threading
import time

import httpx


def metric(url, name):
    for line in httpx.get(url + "/metrics").text.splitlines():
        if line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def complete(url, prompt, max_tokens):
    r = httpx.post(url + "/v1/completions", timeout=3600, json={"prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True})
    r.raise_for_status()
    return r.json()["choices"][0]["text"]


def at_once(url, prompts, max_tokens):
    out = [None] * len(prompts)

    def run(i):
        out[i] = complete(url, prompts[i], max_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def wait_idle(url, seconds=30):
    deadline = time.time() + seconds
    while time.time() < deadline:
        running, used = metric(url, "vllm:num_requests_running"), metric(url, "duo:kv_blocks_used")
        if running == 0 and used == 0:
            return True, running, used
        time.sleep(0.2)
    return False, running, used


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--tiny-url")
    ap.add_argument("--haystack", required=True)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--tiny-max-tokens", type=int, default=700)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    files = sorted(f for f in os.listdir(a.haystack) if f.endswith(".txt"))
    text = "\n\n".join(open(os.path.join(a.haystack, f)).read() for f in files)
    tokens = httpx.post(a.url + "/tokenize", json={"prompt": text[:200000]}).json()["tokens"]
    rng = random.Random(a.seed)
    lengths = [rng.randint(100, 6000) for _ in range(a.requests)]
    prompts = [tokens[(997 * i) % (len(tokens) - n):][:n] for i, n in enumerate(lengths)]
    summary = {"requests": a.requests, "prompt_lengths": lengths, "max_tokens": a.max_tokens}

    t0 = time.time()
    together = at_once(a.url, prompts, a.max_tokens)
    summary["together_s"] = round(time.time() - t0, 2)
    summary["peak_running"] = metric(a.url, "duo:num_requests_running_peak")
    alone = [complete(a.url, p, a.max_tokens) for p in prompts]
    same = [x == y for x, y in zip(together, alone)]
    summary["same_as_alone"] = f"{sum(same)}/{len(same)}"
    summary["different"] = [{"i": i, "len": lengths[i], "together": together[i], "alone": alone[i]} for i, s in enumerate(same) if not s]
    ok = all(same)

    if a.tiny_url:
        # Short prompts admitted together, then long generations that outgrow the pool: the
        # youngest sequences are preempted and recomputed.
        small = [p[:150 + 20 * i] for i, p in enumerate(prompts[:12])]
        alone_small = [complete(a.url, p, a.tiny_max_tokens) for p in small]
        before = metric(a.tiny_url, "vllm:num_preemptions_total")
        tiny = at_once(a.tiny_url, small, a.tiny_max_tokens)
        summary["tiny_pool_blocks"] = metric(a.tiny_url, "duo:kv_blocks_total")
        summary["tiny_pool_requests"] = [len(p) for p in small]
        summary["tiny_pool_preemptions"] = metric(a.tiny_url, "vllm:num_preemptions_total") - before
        same_tiny = [x == y for x, y in zip(tiny, alone_small)]
        summary["tiny_pool_same_as_alone"] = f"{sum(same_tiny)}/{len(same_tiny)}"
        ok &= all(same_tiny) and summary["tiny_pool_preemptions"] > 0

    # A client that goes away mid-stream.
    with httpx.stream("POST", a.url + "/v1/completions", timeout=60,
                      json={"prompt": prompts[0], "max_tokens": 3000, "temperature": 0, "ignore_eos": True, "stream": True}) as r:
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: "):
                seen += 1
            if seen >= 5:
                summary["blocks_while_streaming"] = metric(a.url, "duo:kv_blocks_used")
                break
    idle, running, used = wait_idle(a.url)
    summary["after_disconnect"] = {"running": running, "kv_blocks_used": used}
    ok &= idle and summary.get("blocks_while_streaming", 0) > 0
    summary["ok"] = ok
    with open(a.out, "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "prompt_lengths"}))
    raise SystemExit(0 if ok else 1)


if __name__ == "__main__":
    main()

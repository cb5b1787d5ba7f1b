#!/usr/bin/env python3
"""PyTorch's decode attention on the Llama-3-8B layer shape (32 query / 8 KV heads of 128, bf16),
the peer of the `time decode attention` lines of `duo cuda-check`, run in the same device call:
`scaled_dot_product_attention` with one query per sequence over dense (unpaged) caches, and the
device-to-device copy bandwidth (bytes read + written per second) that the floors divide by.

  python3 scripts/torch_decode_attention.py --out decode-attention-torch.json
"""

import argparse
import json

import torch
import torch.nn.functional as F


def timed(f, iters):
    f()
    torch.cuda.synchronize()
    start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        f()
    stop.record()
    torch.cuda.synchronize()
    return start.elapsed_time(stop) / iters


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    dev = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": []}
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 10)
    results["copy_bandwidth_gb_s"] = round(2 * src.numel() * 2 / ms / 1e6, 1)
    print(f"copy bandwidth {results['copy_bandwidth_gb_s']:.0f} GB/s (read + written)")
    del src, dst
    for rows, tokens in [(1, 131072), (32, 4096), (16, 32768), (25, 16384)]:
        gen = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(rows, 32, 1, 128, dtype=torch.bfloat16, device=dev, generator=gen)
        k = torch.randn(rows, 8, tokens, 128, dtype=torch.bfloat16, device=dev, generator=gen)
        v = torch.randn(rows, 8, tokens, 128, dtype=torch.bfloat16, device=dev, generator=gen)
        ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), a.iters)
        kv_bytes = 2 * k.numel() * 2
        row = {"rows": rows, "tokens": tokens, "ms": round(ms, 4), "kv_mb": round(kv_bytes / 1e6), "gb_s": round(kv_bytes / ms / 1e6)}
        results["rows"].append(row)
        print(f"torch sdpa decode attention, Llama-3-8B layer, full {rows:>2} x {tokens:>6} tokens: {ms:.3f} ms per call, {row['kv_mb']} MB of KV read, {row['gb_s']} GB/s")
        del q, k, v
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

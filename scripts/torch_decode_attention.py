#!/usr/bin/env python3
"""PyTorch's decode attention on the Llama-3-8B layer shape (32 query / 8 KV heads of 128, bf16),
the peer of the `time decode attention` lines of `duo cuda-check`, run in the same device call:
`scaled_dot_product_attention` with one query per sequence over dense (unpaged) caches, and the
device-to-device copy bandwidth (bytes read + written per second) that the floors divide by.

  python3 scripts/torch_decode_attention.py --out decode-attention-torch.json [--bytes]
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
    ap.add_argument("--bytes", action="store_true", help="one row over a range of lengths, and the 16 query / 4 KV heads of half a layer at 131,072 (the peers of `duo cuda-check --timings bytes`)")
    a = ap.parse_args()
    dev = torch.device("cuda")
    results = {"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": []}
    src = torch.empty(1 << 30, dtype=torch.bfloat16, device=dev)
    dst = torch.empty_like(src)
    ms = timed(lambda: dst.copy_(src), 10)
    results["copy_bandwidth_gb_s"] = round(2 * src.numel() * 2 / ms / 1e6, 1)
    print(f"copy bandwidth {results['copy_bandwidth_gb_s']:.0f} GB/s (read + written)")
    del src, dst
    shapes = [(1, 131072, 8), (32, 4096, 8), (16, 32768, 8), (25, 16384, 8)]
    if a.bytes:
        shapes = [(1, t, 8) for t in (2048, 8192, 32768, 65536, 131072, 262144)] + [(1, 131072, 4)]
    for rows, tokens, kv_heads in shapes:
        gen = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(rows, 4 * kv_heads, 1, 128, dtype=torch.bfloat16, device=dev, generator=gen)
        k = torch.randn(rows, kv_heads, tokens, 128, dtype=torch.bfloat16, device=dev, generator=gen)
        v = torch.randn(rows, kv_heads, tokens, 128, dtype=torch.bfloat16, device=dev, generator=gen)
        ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), a.iters)
        kv_bytes = 2 * k.numel() * 2
        row = {"rows": rows, "tokens": tokens, "kv_heads": kv_heads, "ms": round(ms, 4), "kv_mb": round(kv_bytes / 1e6), "gb_s": round(kv_bytes / ms / 1e6)}
        results["rows"].append(row)
        name = "layer, full" if kv_heads == 8 else f"{4 * kv_heads} query / {kv_heads} KV heads"
        print(f"torch sdpa decode attention, Llama-3-8B {name} {rows:>2} x {tokens:>6} tokens: {ms:.4f} ms per call, {row['kv_mb']} MB of KV read, {row['gb_s']} GB/s")
        del q, k, v
    with open(a.out, "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()

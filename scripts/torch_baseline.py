#!/usr/bin/env python3
"""The PyTorch baseline for the CUDA benchmarks: what a user would run instead of duo.

A Llama-shaped model with seeded random bf16 weights, full attention through
torch.nn.functional.scaled_dot_product_attention (GQA via enable_gqa; chunked prefill with a
lower-right causal mask, so no mask is materialised), and a static KV cache allocated once
for the longest context. Batch 1. For each context: chunked prefill time, decode ms/token
(mean over --decode-tokens steps after the prefill, CUDA events), and peak GPU memory.

  python3 scripts/torch_baseline.py --shape llama-3-8b --contexts 32768,65536,131072 --out torch-l3.json

Shapes match `duo bench --random-weights` (llama-3-8b: 32 layers, 32 query / 8 KV heads,
FFN 14336, vocab 128256; llama-2-7b: 32 layers, 32 / 32 heads, FFN 11008, vocab 32000).
"""

import argparse
import json
import math
import time

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

SHAPES = {
    "llama-3-8b": dict(layers=32, hidden=4096, heads=32, kv_heads=8, ffn=14336, vocab=128256, theta=3.5807e9),
    "llama-2-7b": dict(layers=32, hidden=4096, heads=32, kv_heads=32, ffn=11008, vocab=32000, theta=10000.0),
}


class Model:
    def __init__(self, s, max_ctx, seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        dev, dt = "cuda", torch.bfloat16
        self.s = s
        self.hd = s["hidden"] // s["heads"]
        w = lambda *shape: (torch.randn(*shape, generator=g, device=dev, dtype=torch.float32) * 0.02).to(dt)
        h, kvd = s["hidden"], s["kv_heads"] * self.hd
        self.embed = w(s["vocab"], h)
        self.layers = [dict(qkv=w(h + 2 * kvd, h), o=w(h, h), gate_up=w(2 * s["ffn"], h), down=w(h, s["ffn"]),
                            n1=torch.ones(h, device=dev, dtype=dt), n2=torch.ones(h, device=dev, dtype=dt)) for _ in range(s["layers"])]
        self.norm = torch.ones(h, device=dev, dtype=dt)
        self.head = w(s["vocab"], h)
        # Static KV cache: [layers][2] of [1, kv_heads, max_ctx, head_dim].
        self.cache = [[torch.zeros(1, s["kv_heads"], max_ctx, self.hd, device=dev, dtype=dt) for _ in range(2)] for _ in range(s["layers"])]
        inv = 1.0 / (s["theta"] ** (torch.arange(0, self.hd, 2, device=dev, dtype=torch.float32) / self.hd))
        self.inv_freq = inv

    def rope(self, x, pos):
        # x: [1, heads, t, hd]; half-split pairing as in Hugging Face Llama.
        t = x.shape[2]
        ang = torch.outer(torch.arange(pos, pos + t, device=x.device, dtype=torch.float32), self.inv_freq)
        cos, sin = ang.cos().to(x.dtype), ang.sin().to(x.dtype)
        x1, x2 = x[..., : self.hd // 2], x[..., self.hd // 2:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    @torch.no_grad()
    def forward(self, ids, pos):
        s, hd = self.s, self.hd
        t = ids.shape[0]
        x = self.embed[ids]
        for l, p in enumerate(self.layers):
            hn = F.rms_norm(x, (s["hidden"],), p["n1"], 1e-5)
            qkv = hn @ p["qkv"].T
            q, k, v = qkv.split([s["hidden"], s["kv_heads"] * hd, s["kv_heads"] * hd], dim=-1)
            q = self.rope(q.view(t, s["heads"], hd).transpose(0, 1).unsqueeze(0), pos)
            k = self.rope(k.view(t, s["kv_heads"], hd).transpose(0, 1).unsqueeze(0), pos)
            v = v.view(t, s["kv_heads"], hd).transpose(0, 1).unsqueeze(0)
            kc, vc = self.cache[l]
            kc[:, :, pos:pos + t] = k
            vc[:, :, pos:pos + t] = v
            keys, values = kc[:, :, : pos + t], vc[:, :, : pos + t]
            mask = causal_lower_right(t, pos + t) if t > 1 else None
            a = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=s["kv_heads"] != s["heads"])
            x = x + a.squeeze(0).transpose(0, 1).reshape(t, s["hidden"]) @ p["o"].T
            hn = F.rms_norm(x, (s["hidden"],), p["n2"], 1e-5)
            gu = hn @ p["gate_up"].T
            gate, up = gu.chunk(2, dim=-1)
            x = x + (F.silu(gate) * up) @ p["down"].T
        x = F.rms_norm(x[-1:], (s["hidden"],), self.norm, 1e-5)
        return x @ self.head.T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", choices=sorted(SHAPES), default="llama-3-8b")
    ap.add_argument("--contexts", default="32768")
    ap.add_argument("--decode-tokens", type=int, default=32)
    ap.add_argument("--chunk", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-prefill", type=int, default=1 << 62,
                    help="longer contexts get seeded random KV in the static cache instead of a prefill; only decode is timed")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    contexts = [int(c) for c in a.contexts.split(",")]
    s = SHAPES[a.shape]
    rows = []
    for ctx in contexts:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        row = dict(engine=f"pytorch {torch.__version__} sdpa", shape=a.shape, context=ctx, chunk=a.chunk, gpu=torch.cuda.get_device_name())
        try:
            m = Model(s, ctx + a.decode_tokens + 1, a.seed)
            g = torch.Generator().manual_seed(a.seed)
            ids = torch.randint(100, s["vocab"], (ctx,), generator=g).cuda()
            logits = m.forward(ids[:64], 0)  # warm-up (kernel selection); the prefill below overwrites its cache rows
            torch.cuda.synchronize()
            if ctx <= a.max_prefill:
                t0 = time.perf_counter()
                for pos in range(0, ctx, a.chunk):
                    logits = m.forward(ids[pos:pos + a.chunk], pos)
                torch.cuda.synchronize()
                row["prefill_s"] = time.perf_counter() - t0
            else:
                for layer in m.cache:
                    for t in layer:
                        t.normal_(generator=torch.Generator(device="cuda").manual_seed(a.seed))
                row["prefill_s"] = None
            nxt = logits[-1:].argmax(-1) if logits.dim() > 1 else logits.argmax(-1)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            m.forward(nxt, ctx)  # warm-up step
            start.record()
            for i in range(a.decode_tokens):
                nxt = m.forward(nxt, ctx + 1 + i).argmax(-1)
            end.record()
            torch.cuda.synchronize()
            row["decode_ms_per_token"] = start.elapsed_time(end) / a.decode_tokens
            row["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            free, total = torch.cuda.mem_get_info()
            row["device_used_gib"] = (total - free) / 2**30  # the whole card, CUDA context and allocator cache included
            del m
        except torch.OutOfMemoryError:
            row["error"] = "out of memory"
            m = None
        print(json.dumps(row), flush=True)
        rows.append(row)
    json.dump(rows, open(a.out, "w"), indent=1)


if __name__ == "__main__":
    main()

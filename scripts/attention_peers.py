#!/usr/bin/env python3
"""The attention kernels duo's are measured against, on the Llama-3-8B layer shape (32 query /
8 KV heads of 128, bf16), run in the same device call as `duo cuda-check`'s timings so every
ratio is side by side (issue 16):

  decode   one query per sequence over N cached tokens: PyTorch's scaled_dot_product_attention,
           for the full layer and for the duo 0.5 layer (4 retrieval KV heads over N tokens, 4
           streaming heads over their 64 + 256 window: two calls, timed together);
  prefill  a chunk of 16,384 queries after `first` cached tokens, causal (aligned to the end of
           the keys): SDPA (lower-right causal bias), FlexAttention compiled by Triton (a block
           mask; the duo layer's streaming heads with the Λ mask, sink 64 + recent 256), and
           FlashAttention-4's Hopper kernel where its wheels are importable (full layer only).

FLOPs count 4 x head_dim x visible (query, key) pairs x query heads, as duo's timings do (a
duo layer: its retrieval heads' causal pairs).
Without a GPU (or torch) it says so and exits 1.

  python3 scripts/attention_peers.py --out attention-peers.json
  PYTHONPATH=FA4:FA4/nvidia_cutlass_dsl/dsl_packages python3 scripts/attention_peers.py --out ...
"""

import argparse
import json
import sys

try:
    import torch
    import torch.nn.functional as F
except ImportError:
    sys.exit("attention_peers.py needs PyTorch with CUDA")

from torch_decode_attention import timed  # beside this script: CUDA-event timing

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
GROUP = HEADS // KV_HEADS
SINK, RECENT = 64, 256


def causal_pairs(chunk, first):
    """Visible (query, key) pairs of a causal chunk of `chunk` queries after `first` keys."""
    return chunk * first + chunk * (chunk + 1) // 2


def decode_rows(dev, iters, out):
    for tokens in [131072, 524288]:
        gen = torch.Generator(device=dev).manual_seed(0)
        q = torch.randn(1, HEADS, 1, HEAD_DIM, dtype=torch.bfloat16, device=dev, generator=gen)
        k = torch.randn(1, KV_HEADS, tokens, HEAD_DIM, dtype=torch.bfloat16, device=dev, generator=gen)
        v = torch.randn_like(k)
        ms = timed(lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True), iters)
        kv = 2 * k.numel() * 2
        out.append({"kernel": "sdpa", "phase": "decode", "layer": "full", "tokens": tokens, "ms": round(ms, 4), "gb_s": round(kv / ms / 1e6)})
        # The duo 0.5 layer: half the KV heads (and their query heads) over every token, half
        # over their window.
        half = KV_HEADS // 2
        qr, qs = q[:, : half * GROUP].contiguous(), q[:, half * GROUP :].contiguous()
        kr, vr = k[:, :half].contiguous(), v[:, :half].contiguous()
        ks, vs = k[:, half:, : SINK + RECENT].contiguous(), v[:, half:, : SINK + RECENT].contiguous()

        def duo():
            F.scaled_dot_product_attention(qr, kr, vr, enable_gqa=True)
            F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True)

        ms = timed(duo, iters)
        kv = 2 * (kr.numel() + ks.numel()) * 2
        out.append({"kernel": "sdpa", "phase": "decode", "layer": "duo 0.5", "tokens": tokens, "ms": round(ms, 4), "gb_s": round(kv / ms / 1e6)})
        del q, k, v, qr, qs, kr, vr, ks, vs


def prefill_rows(dev, iters, out, fa4):
    from torch.nn.attention.bias import causal_lower_right
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    flex = torch.compile(flex_attention)
    chunk = 16384
    for first in [16384, 114688]:
        n = first + chunk
        gen = torch.Generator(device=dev).manual_seed(1)
        q = torch.randn(1, HEADS, chunk, HEAD_DIM, dtype=torch.bfloat16, device=dev, generator=gen)
        k = torch.randn(1, KV_HEADS, n, HEAD_DIM, dtype=torch.bfloat16, device=dev, generator=gen)
        v = torch.randn_like(k)
        full_flops = 4 * HEAD_DIM * causal_pairs(chunk, first) * HEADS
        # SDPA: its fused kernels take the lower-right causal bias with every head expanded.
        ke, ve = k.repeat_interleave(GROUP, dim=1), v.repeat_interleave(GROUP, dim=1)
        bias = causal_lower_right(chunk, n)
        ms = timed(lambda: F.scaled_dot_product_attention(q, ke, ve, attn_mask=bias), iters)
        out.append({"kernel": "sdpa", "phase": "prefill", "layer": "full", "chunk": chunk, "first": first, "ms": round(ms, 2), "tflops": round(full_flops / ms / 1e9)})
        del ke, ve

        def causal(b, h, q_idx, kv_idx):
            return q_idx + first >= kv_idx

        def streaming(b, h, q_idx, kv_idx):
            # Λ: the sinks and the recent window, causal.
            p = q_idx + first
            return (p >= kv_idx) & ((kv_idx < SINK) | (p - kv_idx < RECENT))

        mask = create_block_mask(causal, B=None, H=None, Q_LEN=chunk, KV_LEN=n, device=dev)
        ms = timed(lambda: flex(q, k, v, block_mask=mask, enable_gqa=True), iters)
        out.append({"kernel": "flex", "phase": "prefill", "layer": "full", "chunk": chunk, "first": first, "ms": round(ms, 2), "tflops": round(full_flops / ms / 1e9)})
        # The duo 0.5 layer as two calls, as the reference implementation runs it: the first
        # half of the KV heads (and their query heads) retrieval, causal; the rest streaming,
        # Λ. (One call with a per-head mask would need the whole heads x queries x keys mask
        # built densely first: 64 GiB at 128K.)
        lambda_mask = create_block_mask(streaming, B=None, H=None, Q_LEN=chunk, KV_LEN=n, device=dev)
        half = KV_HEADS // 2
        qr, qs = q[:, : half * GROUP].contiguous(), q[:, half * GROUP :].contiguous()
        kr, vr = k[:, :half].contiguous(), v[:, :half].contiguous()
        ks, vs = k[:, half:].contiguous(), v[:, half:].contiguous()

        def duo():
            flex(qr, kr, vr, block_mask=mask, enable_gqa=True)
            flex(qs, ks, vs, block_mask=lambda_mask, enable_gqa=True)

        # As duo's timings count a duo layer: its retrieval heads' causal work (the streaming
        # heads' Λ work is a few percent of it).
        duo_flops = 4 * HEAD_DIM * causal_pairs(chunk, first) * (HEADS // 2)
        ms = timed(duo, iters)
        del qr, qs, kr, vr, ks, vs
        out.append({"kernel": "flex", "phase": "prefill", "layer": "duo 0.5", "chunk": chunk, "first": first, "ms": round(ms, 2), "tflops": round(duo_flops / ms / 1e9)})
        if fa4 is not None:
            # [batch, tokens, heads, head_dim]; causal=True aligns the queries to the keys' end.
            qt, kt, vt = q.transpose(1, 2).contiguous(), k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()
            try:
                ms = timed(lambda: fa4(qt, kt, vt, causal=True), iters)
                out.append({"kernel": "fa4", "phase": "prefill", "layer": "full", "chunk": chunk, "first": first, "ms": round(ms, 2), "tflops": round(full_flops / ms / 1e9)})
            except Exception as e:  # noqa: BLE001 - its rows are left out, the others kept
                print(f"FlashAttention-4 failed: {type(e).__name__}: {str(e)[:400]}", file=sys.stderr)
            del qt, kt, vt
        del q, k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_peers.py needs a CUDA device")
    dev = torch.device("cuda")
    try:
        from flash_attn.cute import flash_attn_func as fa4
    except ImportError:
        fa4 = None
        print("FlashAttention-4 is not importable: its rows are left out", file=sys.stderr)
    rows = []
    # A peer that fails (out of memory, a compiler's refusal) loses its own rows, not the
    # others': what was measured is still written.
    for phase in (lambda: decode_rows(dev, 50, rows), lambda: prefill_rows(dev, a.iters, rows, fa4)):
        try:
            phase()
        except Exception as e:  # noqa: BLE001 - reported, and the rows so far are kept
            print(f"a peer failed: {type(e).__name__}: {str(e)[:400]}", file=sys.stderr)
            torch.cuda.empty_cache()
    for r in rows:
        if r["phase"] == "decode":
            print(f"peer decode attention, Llama-3-8B layer, {r['layer']:<8} 1 x {r['tokens']:>6} tokens, {r['kernel']}: {r['ms']:.3f} ms, {r['gb_s']} GB/s")
        else:
            print(f"peer prefill attention, Llama-3-8B layer, {r['layer']:<8} chunk {r['chunk']} at {r['first']}..{r['first'] + r['chunk']}, {r['kernel']}: {r['ms']:.2f} ms, {r['tflops']} TFLOPS")
    with open(a.out, "w") as f:
        json.dump({"device": torch.cuda.get_device_name(dev), "torch": torch.__version__, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Prefill and decode speed of llama.cpp (llama-cpp-python) on a GGUF model, in the same
shape as `duo bench`: a prompt of N seeded random tokens, then D greedy decode steps.
By default f32 KV cache and no flash attention, like duo's CPU path; `--default-config` runs
llama.cpp's own defaults instead (f16 KV cache, flash attention), its fastest on this CPU.

    python3 scripts/llama_cpp_bench.py MODEL.gguf --lengths 512,2048,8000 --decode 32 --threads 2
"""
import argparse
import random
import time

import llama_cpp
import numpy as np
from llama_cpp import Llama


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--lengths", default="512,2048,8000")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--default-config", action="store_true", help="f16 KV and flash attention (llama.cpp's defaults)")
    a = ap.parse_args()
    lengths = [int(x) for x in a.lengths.split(",")]
    kv, fa = (1, True) if a.default_config else (0, False)
    llm = Llama(a.model, n_ctx=max(lengths) + a.decode + 8, n_batch=512, n_threads=a.threads,
                type_k=kv, type_v=kv, flash_attn=fa, verbose=False)
    config = "f16 KV, flash attention" if a.default_config else "f32 KV"
    rng = random.Random(0)
    print("| engine | context | prefill s | prefill tok/s | decode ms/token | decode tok/s |")
    print("|---|---|---|---|---|---|")
    for n in lengths:
        prompt = [rng.randrange(100, llm.n_vocab()) for _ in range(n)]
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        prefill = time.perf_counter() - t0
        ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
        nxt = int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))
        t1 = time.perf_counter()
        for _ in range(a.decode):
            llm.eval([nxt])
            ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
            nxt = int(np.argmax(np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),))))
        decode = (time.perf_counter() - t1) / a.decode
        print(f"| llama.cpp {llama_cpp.__version__} ({config}) | {n} | {prefill:.2f} | {n / prefill:.1f} | {decode * 1000:.2f} | {1 / decode:.1f} |", flush=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Regenerate tests/fixtures/llama_cpp_smollm2.json: what llama.cpp computes on the
default model (SmolLM2-135M-Instruct Q4_1), for duo's parity test.

For each prompt: llama.cpp's token ids, its greedy continuation (argmax at every step)
and the top-64 logits at the final prompt position. llama.cpp runs with an f32 KV cache
and without flash attention, so the only numeric differences left are summation order.

Long prompts are cut from the Paul Graham essays in ../shared/reference (never copied
into the repository): the fixture stores the recipe, the test rebuilds the text.

Usage (llama-cpp-python built as ../shared/GPU.md says; on CPUs without AVX-512 use
-DGGML_AVX512=OFF):
    python3 scripts/llama_cpp_fixtures.py MODEL.gguf HAYSTACK_DIR > tests/fixtures/llama_cpp_smollm2.json
"""
import json
import os
import sys

import llama_cpp
import numpy as np
from llama_cpp import Llama

GREEDY_TOKENS = 24
TOP = 64


def haystack(directory, chars):
    files = sorted(f for f in os.listdir(directory) if f.endswith(".txt"))
    text = "\n\n".join(open(os.path.join(directory, f), encoding="utf-8").read() for f in files)
    return text[:chars]


def last_logits(llm):
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).astype(np.float64)


def main():
    model_path, hay_dir = sys.argv[1], sys.argv[2]
    llm = Llama(model_path, n_ctx=8192, n_batch=512, n_threads=2, type_k=0, type_v=0,
                flash_attn=False, verbose=False, logits_all=False, seed=0)
    chat = ("<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
            "<|im_start|>user\nWhat is the best thing to do in San Francisco?<|im_end|>\n<|im_start|>assistant\n")
    cases = [
        {"name": "short", "text": "The capital of France is"},
        {"name": "digits", "text": "Count: 1, 2, 3, 5, 8, 13, 21,"},
        {"name": "code", "text": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n"},
        {"name": "chat", "text": chat},
        {"name": "essays-1k", "haystack_chars": 4200},
        {"name": "essays-4k", "haystack_chars": 17000},
    ]
    out = {"model_sha256": "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
           "llama_cpp_python": __import__("llama_cpp").__version__,
           "settings": "n_ctx 8192, n_batch 512, f32 KV cache, no flash attention, greedy argmax",
           "cases": []}
    for case in cases:
        text = case.get("text") or haystack(hay_dir, case["haystack_chars"])
        ids = llm.tokenize(text.encode("utf-8"), add_bos=False, special=True)
        llm.reset()
        llm.eval(ids)
        logits = last_logits(llm)
        top = np.argsort(-logits, kind="stable")[:TOP]
        greedy = []
        cur = logits
        for _ in range(GREEDY_TOKENS):
            nxt = int(np.argmax(cur))
            greedy.append(nxt)
            if nxt == 2:
                break
            llm.eval([nxt])
            cur = last_logits(llm)
        rec = {k: v for k, v in case.items() if k != "text"}
        if "text" in case:
            rec["text"] = case["text"]
        rec.update({"prompt_token_ids": ids, "greedy_token_ids": greedy,
                    "top_logits": [[int(i), float(logits[i])] for i in top]})
        out["cases"].append(rec)
        print(f"{case['name']}: {len(ids)} prompt tokens, greedy {llm.detokenize(greedy)!r}", file=sys.stderr)
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()

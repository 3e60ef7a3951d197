#!/usr/bin/env python
"""Time greedy decoding of a GGUF with llama-cpp-python: bench_peers.py's llama.cpp child. Runs with the python of
llama.cpp's own venv (no mtx, no numpy beyond what llama_cpp brings).

Reads JSON on stdin: ``{"gguf", "threads", "prompt" (token ids), "new_tokens", "kv_type" (f16 | f32), "mmap"}``; prints
``{"ttft", "steps", "tokens", "settings"}`` on stdout, like benchlib.timed_twice: a warm-up run, then the timed one.

As mtx is timed (benchlib.mtx_decode_runner): batch 1, the prompt evaluated in one batch, then one token per
``eval``; each next token is the argmax of the last logits (no sampler). TTFT is the prompt's evaluation and its
argmax; each step time is one token's evaluation and argmax.
"""

from __future__ import annotations

import json
import resource
import sys
import time

import numpy as np
from llama_cpp import Llama

#: llama.cpp's KV cache element types by name (GGML_TYPE_F32 / F16).
KV_TYPES = {"f32": 0, "f16": 1}


def main() -> None:
    req = json.load(sys.stdin)
    prompt: list[int] = req["prompt"]
    new: int = req["new_tokens"]
    kv = KV_TYPES[req.get("kv_type", "f16")]
    llm = Llama(model_path=req["gguf"], n_threads=req["threads"], n_threads_batch=req["threads"],
                n_ctx=len(prompt) + new + 16, n_batch=max(512, len(prompt)), n_ubatch=max(512, len(prompt)),
                type_k=kv, type_v=kv, use_mmap=req.get("mmap", True), verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,))))

    def run() -> tuple[float, list[float], list[int]]:
        llm.reset()  # the next eval drops the whole KV cache (positions from n_tokens = 0 on)
        t0 = time.perf_counter()
        llm.eval(prompt)
        tokens = [next_token()]
        ttft = time.perf_counter() - t0
        steps = []
        for _ in range(new - 1):
            s = time.perf_counter()
            llm.eval(tokens[-1:])
            tokens.append(next_token())
            steps.append(time.perf_counter() - s)
        return ttft, steps, tokens

    run()  # warm-up
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
    ttft, steps, tokens = run()
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults
    settings = {"n_threads": req["threads"], "n_ctx": llm.n_ctx(), "kv_cache_type": req.get("kv_type", "f16"),
                "flash_attn": bool(llm.context_params.flash_attn_type > 0), "mmap": req.get("mmap", True),
                "major_page_faults_timed_run": faults}
    print(json.dumps({"ttft": ttft, "steps": steps, "tokens": tokens, "settings": settings}))


if __name__ == "__main__":
    main()

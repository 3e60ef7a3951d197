#!/usr/bin/env python
"""Throughput of one shared Generator used from 1 thread and from N threads at once (prints JSON).

    python scripts/bench_threads.py [CKPT_OR_OUT] [--backend torch] [--threads-per-call 2] [--workers 8]

Each of the N workers generates ``--new-tokens`` greedy tokens for its own prompt through the same
Generator; the figure is total generated tokens / wall time. The single-thread run does the same
prompts one after another. Every worker's tokens must equal the single-thread tokens.
"""

from __future__ import annotations

import argparse
import json
import threading
import time

import mtx


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path", nargs="?", default=None, help="checkpoint or export (default: the built-in Mistral)")
    ap.add_argument("--backend", default="torch")
    ap.add_argument("--threads-per-call", type=int, default=2, help="intra-op threads of the engine")
    ap.add_argument("--workers", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()
    gen = mtx.load(a.path, a.backend, threads=a.threads_per_call)
    prompts = [[i + 3, i + 4, i + 5, i + 6] for i in range(a.workers)]
    gen.generate([prompts[0]], max_new_tokens=4, stop_token_ids=[])  # warm-up

    t0 = time.perf_counter()
    alone = [gen.generate([p], max_new_tokens=a.new_tokens, stop_token_ids=[])[0] for p in prompts]
    serial = time.perf_counter() - t0

    got: dict[int, list[int]] = {}

    def work(i: int) -> None:
        got[i] = gen.generate([prompts[i]], max_new_tokens=a.new_tokens, stop_token_ids=[])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(a.workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    shared = time.perf_counter() - t0
    tokens = a.workers * a.new_tokens
    print(json.dumps({
        "backend": gen.backend.name, "workers": a.workers, "threads_per_call": a.threads_per_call,
        "one_thread_tok_s": round(tokens / serial, 1), "shared_tok_s": round(tokens / shared, 1),
        "ratio": round(serial / shared, 3), "identical_tokens": [got[i] for i in range(a.workers)] == alone,
    }, indent=2))


if __name__ == "__main__":
    main()

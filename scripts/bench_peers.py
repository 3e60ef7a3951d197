#!/usr/bin/env python
"""mtx against onnxruntime-genai and transformers, side by side in one run. Prints JSON.

    python scripts/bench_peers.py [--work /tmp/mtx-bench] [--threads 2] [--new-tokens 256]

Setup (issue #4): a ~125M-parameter Mistral-shaped float32 checkpoint (hidden 768, 12 layers, 12 heads,
4 KV heads, intermediate 2048, vocab 32000, window 256), batch 1, prompt 128, 256 new tokens, 2 threads.
Each system decodes greedily from the same random prompt; the script also checks they produce the
same tokens. genai's builder keeps the window only when config.json has
``layer_types = ["sliding_attention"] * n_layers``, so its copy of the checkpoint gets that key.

The bandwidth bound is the bytes of weights read per decoded token (every matrix but the embedding
table, in float32) divided by the machine's read bandwidth (``benchlib.read_bandwidth``: read-only streaming
over a 3 GiB buffer, one slice per thread on the benchmark's threads, median of 7 runs).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import benchlib
from benchlib import SHAPE, make_checkpoint, summarize


def weight_bytes(ckpt: Path) -> tuple[int, int]:
    """(bytes of all weights, bytes read per decoded token: everything but the embedding table)."""
    from mtx.models.checkpoint import Checkpoint

    ck = Checkpoint(ckpt)
    total = sum(r.nbytes for s in ck.sources.values() for r in s.refs)
    embed = sum(r.nbytes for r in ck.sources["embed.weight"].refs)
    return total, total - embed


def mtx_runner(ckpt: Path, work: Path, threads: int, prompt: list[int], new: int):
    """A function timing one greedy generation with mtx (ONNX Runtime backend): (ttft, step times, tokens)."""
    out = benchlib.export_once(ckpt, work / "mtx-ort")
    return benchlib.mtx_decode_runner(out, threads, prompt, new)


def genai_runner(ckpt: Path, work: Path, threads: int, prompt: list[int], new: int):
    """A function timing one greedy generation with onnxruntime-genai: (ttft, step times, tokens)."""
    src = benchlib.genai_source(ckpt, work, "mistral-125m")
    out = benchlib.genai_build(src, work / "genai-fp32-cpu", "fp32", work, threads)
    return benchlib.genai_decode_runner(out, prompt, new)


def bench_transformers(ckpt: Path, threads: int, prompt: list[int], new: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager", dtype=torch.float32).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        ttft = time.perf_counter() - t0
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        tokens = [int(tok)]
        steps = []
        for _ in range(new - 1):
            s = time.perf_counter()
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - s)
            tokens.append(int(tok))
    return {"decode_tokens_per_s": round(len(steps) / sum(steps), 1), "time_to_first_token_s": round(ttft, 4),
            "decode_step_ms_median": round(1000 * float(np.median(steps)), 3), "tokens": tokens}


def child(system: str, a: argparse.Namespace) -> None:
    """One system in its own process: a warm-up run, then one timed run; prints JSON on stdout."""
    ckpt = make_checkpoint(a.work)
    prompt = benchlib.bench_prompt(a.prompt_len)
    if system == "transformers":
        print(json.dumps(bench_transformers(ckpt, a.threads, prompt, a.new_tokens)))
        return
    run = (mtx_runner if system == "mtx" else genai_runner)(ckpt, a.work, a.threads, prompt, a.new_tokens)
    print(json.dumps(benchlib.timed_twice(run)))


def in_child(system: str, a: argparse.Namespace) -> dict:
    return benchlib.run_json([sys.executable, __file__, "--child", system, "--work", a.work, "--threads", a.threads,
                              "--prompt-len", a.prompt_len, "--new-tokens", a.new_tokens], f"bench_peers: {system}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(ap, work="/tmp/mtx-bench", prompt_len=128, new_tokens=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per system, alternating mtx and genai")
    ap.add_argument("--skip", action="append", default=[], choices=["genai", "transformers"])
    ap.add_argument("--child", choices=["mtx", "genai", "transformers"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.child:
        child(a.child, a)
        return
    ckpt = make_checkpoint(a.work)
    # Each system runs in a process of its own (two ONNX Runtime sessions in one process compete
    # through their spinning thread pools on 2 cores), after a warm-up run; mtx and genai alternate, so
    # drifts of this shared machine's speed hit both alike. Medians are reported with every sample.
    systems = ["mtx"] + ([] if "genai" in a.skip else ["genai"])
    runs: dict[str, list] = {name: [] for name in systems}
    for _ in range(a.repeats):
        for name in systems:
            r = in_child(name, a)
            runs[name].append((r["ttft"], r["steps"], r["tokens"]))
    results = {("onnxruntime-genai" if n == "genai" else n): summarize(runs[n]) for n in systems}
    if "transformers" not in a.skip:
        results["transformers-eager"] = in_child("transformers", a)
    total, per_token = weight_bytes(ckpt)
    bandwidth = benchlib.read_bandwidth(a.threads)
    bound = bandwidth["gb_s"] * 1e9 / per_token
    ref = results["mtx"]["tokens"]
    for name, r in results.items():
        toks = r.pop("tokens")
        r["same_tokens_as_mtx"] = toks == ref
        r["ratio_to_bandwidth_bound"] = round(r["decode_tokens_per_s"] / bound, 3)
    report = {
        "setup": {**SHAPE, "dtype": "float32", "batch": 1, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                  "threads": a.threads, "weights_mb": round(total / 2**20, 1),
                  "bytes_read_per_token_mb": round(per_token / 2**20, 1)},
        "memory_bandwidth_gb_s": bandwidth["gb_s"], "memory_bandwidth": bandwidth,
        "bandwidth_bound_tokens_per_s": round(bound, 1),
        "results": results,
    }
    if "onnxruntime-genai" in results:
        g = results["onnxruntime-genai"]
        m = results["mtx"]
        report["mtx_vs_genai"] = {
            "decode_ratio": round(m["decode_tokens_per_s"] / g["decode_tokens_per_s"], 3),
            "ttft_ratio": round(m["time_to_first_token_s"] / g["time_to_first_token_s"], 3),
        }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

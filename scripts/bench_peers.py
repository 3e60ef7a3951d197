#!/usr/bin/env python
"""mtx against onnxruntime-genai and transformers, side by side in one run. Prints JSON.

    python scripts/bench_peers.py [--work /tmp/mtx-bench] [--threads 2] [--new-tokens 256]

Setup (issue #4): a ~125M-parameter Mistral-shaped float32 checkpoint (hidden 768, 12 layers, 12 heads,
4 KV heads, intermediate 2048, vocab 32000, window 256), batch 1, prompt 128, 256 new tokens, 2 threads.
Each system decodes greedily from the same random prompt; the script also checks they produce the
same tokens. genai's builder keeps the window only when config.json has
``layer_types = ["sliding_attention"] * n_layers``, so its copy of the checkpoint gets that key.

The bandwidth bound is the bytes of weights read per decoded token (every matrix but the embedding
table, in float32) divided by the machine's memory bandwidth, measured here with a large copy.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

SHAPE = dict(vocab=32000, hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, window=256)


def make_checkpoint(work: Path) -> Path:
    import make_checkpoint as mk

    ckpt = work / "mistral-125m"
    if not (ckpt / "config.json").exists():
        mk.make_hf(ckpt, "mistral", max_positions=4096, init_std=0.02, seed=0, **SHAPE)
    return ckpt


def weight_bytes(ckpt: Path) -> tuple[int, int]:
    """(bytes of all weights, bytes read per decoded token: everything but the embedding table)."""
    from mtx.models.checkpoint import Checkpoint

    ck = Checkpoint(ckpt)
    total = sum(r.nbytes for s in ck.sources.values() for r in s.refs)
    embed = sum(r.nbytes for r in ck.sources["embed.weight"].refs)
    return total, total - embed


def memory_bandwidth_gbs(threads: int) -> float:
    """Read+write bytes per second of a 512 MB float32 copy with ``threads`` torch threads (best of 5)."""
    import torch

    torch.set_num_threads(threads)
    a = torch.ones(128 * 2**20)
    b = torch.empty_like(a)
    best = 0.0
    for _ in range(5):
        t = time.perf_counter()
        b.copy_(a)
        best = max(best, 2 * a.numel() * 4 / (time.perf_counter() - t))
    return best / 1e9


def bench_mtx(ckpt: Path, work: Path, threads: int, prompt: list[int], new: int) -> dict:
    import mtx.runtime
    from mtx.runtime.bench import run_bench

    out = work / "mtx-ort"
    if not (out / "mtx.json").exists():
        subprocess.run([sys.executable, "-m", "mtx", "export", str(ckpt), "-o", str(out), "--target", "onnxruntime",
                        "--force"], check=True)
    gen = mtx.runtime.load(out, threads=threads)
    res = run_bench(gen, batch=1, prompt_len=len(prompt), new_tokens=new)
    tokens = gen.generate([prompt], max_new_tokens=new, stop_token_ids=[])[0]
    return {"decode_tokens_per_s": res["decode_tokens_per_s"], "time_to_first_token_s": res["time_to_first_token_s"],
            "decode_step_ms_median": res["decode_step_ms_median"], "peak_rss_mb": res["peak_rss_mb"],
            "tokens": tokens}


def bench_genai(ckpt: Path, work: Path, threads: int, prompt: list[int], new: int) -> dict:
    import onnxruntime_genai as og

    src = work / "mistral-125m-genai-src"
    if not src.exists():
        src.mkdir()
        cfg = json.loads((ckpt / "config.json").read_text())
        cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
        (src / "config.json").write_text(json.dumps(cfg, indent=2))
        for f in ckpt.iterdir():
            if f.name != "config.json":
                os.link(f, src / f.name)
    out = work / "genai-fp32-cpu"
    if not (out / "genai_config.json").exists():
        subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o", str(out),
                        "-p", "fp32", "-e", "cpu", "-c", str(work / "genai-cache")], check=True,
                       stdout=subprocess.DEVNULL)
        gc = json.loads((out / "genai_config.json").read_text())
        so = gc["model"]["decoder"].setdefault("session_options", {})
        so["intra_op_num_threads"] = threads
        so["inter_op_num_threads"] = 1
        (out / "genai_config.json").write_text(json.dumps(gc, indent=2))
    model = og.Model(str(out))

    def run() -> tuple[float, list[float], list[int]]:
        params = og.GeneratorParams(model)
        params.set_search_options(max_length=len(prompt) + new, do_sample=False, min_length=len(prompt) + new)
        g = og.Generator(model, params)
        t0 = time.perf_counter()
        g.append_tokens(np.asarray([prompt], dtype=np.int32))
        g.generate_next_token()
        ttft = time.perf_counter() - t0
        steps = []
        while not g.is_done():
            s = time.perf_counter()
            g.generate_next_token()
            steps.append(time.perf_counter() - s)
        return ttft, steps, [int(t) for t in g.get_sequence(0)[len(prompt):]]

    run()  # warm-up
    ttft, steps, tokens = run()
    return {"decode_tokens_per_s": round(len(steps) / sum(steps), 1), "time_to_first_token_s": round(ttft, 4),
            "decode_step_ms_median": round(1000 * float(np.median(steps)), 3), "tokens": tokens}


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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mtx-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--skip", action="append", default=[], choices=["genai", "transformers"])
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt = make_checkpoint(a.work)
    prompt = np.random.default_rng(0).integers(3, SHAPE["vocab"], a.prompt_len).tolist()
    results: dict[str, dict] = {}
    # Each system runs in this process one after another; the order is fixed (mtx first).
    results["mtx"] = bench_mtx(ckpt, a.work, a.threads, prompt, a.new_tokens)
    if "genai" not in a.skip:
        results["onnxruntime-genai"] = bench_genai(ckpt, a.work, a.threads, prompt, a.new_tokens)
    if "transformers" not in a.skip:
        results["transformers-eager"] = bench_transformers(ckpt, a.threads, prompt, a.new_tokens)
    total, per_token = weight_bytes(ckpt)
    bw = memory_bandwidth_gbs(a.threads)
    bound = bw * 1e9 / per_token
    ref = results["mtx"]["tokens"]
    for name, r in results.items():
        toks = r.pop("tokens")
        r["same_tokens_as_mtx"] = toks == ref
        r["ratio_to_bandwidth_bound"] = round(r["decode_tokens_per_s"] / bound, 3)
    report = {
        "setup": {**SHAPE, "dtype": "float32", "batch": 1, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                  "threads": a.threads, "weights_mb": round(total / 2**20, 1),
                  "bytes_read_per_token_mb": round(per_token / 2**20, 1)},
        "memory_bandwidth_gb_s": round(bw, 1),
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

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
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]

SHAPE = dict(vocab=32000, hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, window=256)


def make_checkpoint(work: Path) -> Path:
    from mtx import synthetic_checkpoints as mk

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


def mtx_runner(ckpt: Path, work: Path, threads: int, prompt: list[int], new: int):
    """A function timing one greedy generation with mtx (ONNX Runtime backend): (ttft, step times, tokens)."""
    import mtx.runtime

    out = work / "mtx-ort"
    if not (out / "mtx.json").exists():
        subprocess.run([sys.executable, "-m", "mtx", "export", str(ckpt), "-o", str(out), "--target", "onnxruntime",
                        "--force"], check=True, stdout=subprocess.DEVNULL)
    gen = mtx.runtime.load(out, threads=threads)

    def run() -> tuple[float, list[float], list[int]]:
        t0 = time.perf_counter()
        stream = gen.stream(prompt, new, stop_token_ids=[])
        tokens = [next(stream)]
        ttft = time.perf_counter() - t0
        steps = []
        s = time.perf_counter()
        for tok in stream:
            steps.append(time.perf_counter() - s)
            tokens.append(tok)
            s = time.perf_counter()
        return ttft, steps, tokens

    return run


def genai_runner(ckpt: Path, work: Path, threads: int, prompt: list[int], new: int):
    """A function timing one greedy generation with onnxruntime-genai: (ttft, step times, tokens)."""
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
    return genai_decode_runner(out, prompt, new)


def genai_decode_runner(folder: Path, prompt: list[int], new: int):
    """A timed greedy run of onnxruntime-genai's model in ``folder``: (ttft_s, step_s, tokens)."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))

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

    return run


def summarize(runs: list[tuple[float, list[float], list[int]]]) -> dict:
    """Medians over repeated timed runs (each after its own warm-up run)."""
    ttfts = [r[0] for r in runs]
    tps = [len(r[1]) / sum(r[1]) for r in runs]
    return {"decode_tokens_per_s": round(float(np.median(tps)), 1),
            "time_to_first_token_s": round(float(np.median(ttfts)), 4),
            "decode_step_ms_median": round(1000 * float(np.median([np.median(r[1]) for r in runs])), 3),
            "samples": {"decode_tokens_per_s": [round(x, 1) for x in tps],
                        "time_to_first_token_s": [round(x, 4) for x in ttfts]},
            "tokens": runs[-1][2]}


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
    prompt = np.random.default_rng(0).integers(3, SHAPE["vocab"], a.prompt_len).tolist()
    if system == "transformers":
        print(json.dumps(bench_transformers(ckpt, a.threads, prompt, a.new_tokens)))
        return
    run = (mtx_runner if system == "mtx" else genai_runner)(ckpt, a.work, a.threads, prompt, a.new_tokens)
    run()
    ttft, steps, tokens = run()
    print(json.dumps({"ttft": ttft, "steps": steps, "tokens": tokens}))


def in_child(system: str, a: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", system, "--work", str(a.work), "--threads", str(a.threads),
           "--prompt-len", str(a.prompt_len), "--new-tokens", str(a.new_tokens)]
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"bench_peers: {system} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mtx-bench"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=256)
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

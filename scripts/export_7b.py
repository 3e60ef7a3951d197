#!/usr/bin/env python
"""Export a synthetic Mistral-7B-shaped checkpoint and report wall time and peak memory as JSON.

    python scripts/export_7b.py [--workdir /tmp/mtx-7b] [--run onnxruntime:float16 ...] [--keep]
    python scripts/export_7b.py --run onnxruntime:float32:int4 --bench   # quantised (docs/ops.md §7), then mtx bench

The checkpoint has Mistral-7B's shapes (hidden 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128,
intermediate 14336, vocab 32000, sliding window 4096) in float16, ~14.5 GB in three HF-style
shards with ``model.safetensors.index.json``. Its data is cheap and deterministic (a small random
block tiled over every tensor) and is written tensor by tensor, so neither this script nor the
export ever holds the weights in memory. Each ``--run TARGET:DTYPE`` runs ``python -m mtx export``
in a child process (``TARGET:DTYPE:int4`` / ``:int8`` adds ``--quantize``); the report gives its wall
time and peak RSS (the child's ``rusage`` from ``wait4``, children of the child included), and with
``--bench`` the ``mtx bench`` decode speed and RSS of each export on ``--threads`` threads. Everything is deleted afterwards unless ``--keep``;
each export is deleted after its run to save disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

CONFIG = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "sliding_window": 4096, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float16",
}


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """HF Mistral tensor names and shapes in file order (embeddings, layers, norm, head)."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "self_attn.q_proj.weight": (q, h),
                       p + "self_attn.k_proj.weight": (kv, h), p + "self_attn.v_proj.weight": (kv, h),
                       p + "self_attn.o_proj.weight": (h, q), p + "post_attention_layernorm.weight": (h,),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})
    shapes["model.norm.weight"] = (h,)
    shapes["lm_head.weight"] = (v, h)
    return shapes


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], block: torch.Tensor) -> None:
    """A float16 safetensors file written tensor by tensor (one tensor in memory at a time)."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(torch.tensor(shape).prod())
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            numel = int(torch.tensor(shape).prod())
            if name.endswith("norm.weight"):
                t = torch.ones(numel, dtype=torch.float16)
            else:
                t = block.repeat(numel // block.numel() + 1)[:numel]
            f.write(t.numpy().tobytes())


def make_checkpoint(folder: Path, layers: int, shards: int = 3) -> int:
    """Write the synthetic checkpoint into ``folder``; returns its size in bytes."""
    cfg = dict(CONFIG, num_hidden_layers=layers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    shapes = tensor_shapes(cfg)
    names = list(shapes)
    block = (torch.randn(1 << 20, generator=torch.Generator().manual_seed(0)) * 0.02).to(torch.float16)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / file, {n: shapes[n] for n in part}, block)
        weight_map.update({n: file for n in part})
        total += (folder / file).stat().st_size
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def run_export(ckpt: Path, out: Path, target: str, dtype: str, quantize: str | None = None) -> dict:
    """Run ``mtx export`` in a child process; return its manifest and measured wall time / peak RSS."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "mtx", "export", str(ckpt), "-o", str(out), "--target", target, "--dtype", dtype,
           "--json", "--force"] + (["--quantize", quantize] if quantize else [])
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0), stderr.seek(0)
        if proc.returncode:
            sys.stderr.write(stderr.read())
            raise SystemExit(proc.returncode)
        manifest = json.loads(stdout.read())
    peak = usage.ru_maxrss * 1024  # Linux reports KiB
    return {
        "command": " ".join(cmd), "wall_s": round(wall, 1), "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / 2**30, 2), "target": manifest["target"], "dtype": manifest["dtype"],
        "attention_op": manifest["attention_op"], "fallbacks": manifest["fallbacks"], "weights": manifest["weights"],
        "output_bytes": sum(f["bytes"] for f in manifest["files"]),
        "quantization": None if manifest["quantization"] is None else {
            k: v for k, v in manifest["quantization"].items() if k != "tensors"},
    }


def run_bench(out: Path, threads: int, new_tokens: int) -> dict:
    """``mtx bench OUT --json`` in a child process (its own peak RSS from ``wait4`` as well)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    cmd = [sys.executable, "-m", "mtx", "bench", str(out), "--threads", str(threads), "--prompt-len", "16",
           "--new-tokens", str(new_tokens), "--json"]
    with tempfile.TemporaryFile("w+") as stdout, tempfile.TemporaryFile("w+") as stderr:
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=stderr, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        stdout.seek(0), stderr.seek(0)
        if os.waitstatus_to_exitcode(status):
            return {"command": " ".join(cmd), "failed": stderr.read()[-2000:]}
        result = json.loads(stdout.read())
    return {"command": " ".join(cmd), "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2), **result}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mtx-7b"))
    ap.add_argument("--run", action="append", metavar="TARGET:DTYPE",
                    help="an export to measure (repeatable); default onnxruntime:float16")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick run")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the exports")
    ap.add_argument("--bench", action="store_true", help="run mtx bench on each export")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=32)
    a = ap.parse_args()

    ckpt = a.workdir / "checkpoint"
    t0 = time.time()
    size = make_checkpoint(ckpt, a.layers)
    report: dict = {"checkpoint_bytes": size, "checkpoint_write_s": round(time.time() - t0, 1), "runs": []}
    try:
        for spec in a.run or ["onnxruntime:float16"]:
            target, dtype, *quant = spec.split(":")
            out = a.workdir / f"export-{target}-{dtype}{''.join('-' + q for q in quant)}"
            run = run_export(ckpt, out, target, dtype, quant[0] if quant else None)
            if a.bench:
                run["bench"] = run_bench(out, a.threads, a.new_tokens)
            report["runs"].append(run)
            if not a.keep:
                shutil.rmtree(out)
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

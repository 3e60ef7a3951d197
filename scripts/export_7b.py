#!/usr/bin/env python
"""Export a synthetic Mistral-7B-shaped checkpoint; report the export's wall time and memory and, with
``--bench``, decode speed against the machine's bandwidth bound and memory against weights + KV. JSON on
stdout, progress on stderr.

    python scripts/export_7b.py [--workdir /tmp/mtx-7b] [--run onnxruntime:float16 ...] [--keep]
    python scripts/export_7b.py --run onnxruntime:float32:int4 --bench   # quantised (docs/ops.md §7), then mtx bench
    python scripts/export_7b.py --layers 2 --run onnxruntime:float32:int4 --bench   # a quick check of the script

Checkpoint: Mistral-7B's shapes (hidden 4096, 32 layers, 32 heads, 8 KV heads, head_dim 128, intermediate
14336, vocab 32000, sliding window 4096) in float16, ~14.5 GB in three HF-style shards with
``model.safetensors.index.json``. Every tensor has its own random values: a torch generator seeded from
``--seed`` and the tensor's name, N(0, ``--std``) for the matrices (0.02, the scale of trained Mistral
weights), N(1, 0.02) for the norms, drawn in float16 and written in chunks of at most 32 Mi values (64 MB)
after the file's header, so neither this script nor the export ever holds the weights in memory, and no
two pages of the weights are alike (a tiled block lets a host merge pages and the caches serve the
repeats, which overstated decode speed).

Export: each ``--run TARGET:DTYPE`` runs ``python -m mtx export`` in a child process (``TARGET:DTYPE:int4`` /
``:int8`` adds ``--quantize``); reported are its wall time, its peak RSS (``rusage`` from ``wait4``, children
included; a child started by (v)fork + exec starts from this process's RSS, so this script keeps its own
memory small: the checkpoint is written and the bandwidth measured in children too) and its peak memory by
mtx.runtime.memory's rule (anonymous resident bytes + mapped checkpoint and export files, sampled from
here).

Bench (``--bench``): ``mtx bench EXPORT --json`` ``--bench-runs`` times in child processes, each sampled from
here as well (``wait_sampling``: load included). Reported:

- decode tokens/s: the median (min, max) of the runs' ``decode_tokens_per_s``;
- the bound: ``benchlib.read_bandwidth`` (read-only streaming over a 3 GiB buffer, a slice per thread on
  ``--threads`` threads, median of 7 runs, taken just before each bench run so both see the same load; the
  median over runs) divided by the bytes one decode step reads: ``benchlib.bytes_per_token`` of the export's
  graph (every initializer whole, one row of the embedding table) plus the KV reads of the positions attended
  (mean over the timed steps); the ratio of the two, and each run's against its own bandwidth. ``cpu_per_wall``
  (CPU time / wall time, of the bandwidth run and of each bench child) shows whether the threads had their
  cores on this shared machine;
- memory: the runs' ``memory`` (mtx bench's in-process sampler during prefill and decode) and the parent's
  whole-process peak, each against the export's file bytes + ``kv_bytes`` (the KV buffers allocated; they
  are zeroed lazily, but the first prefill makes most of their pages resident).

Everything is deleted afterwards unless ``--keep``; without it each export is deleted after its run to save
disk. ``--reuse`` (with ``--keep``) benches again what a ``--keep`` run left in ``--workdir``, without writing or
exporting it again.
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from typing import Any

import numpy as np

import benchlib

ROOT = Path(__file__).resolve().parents[1]

CONFIG: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"], "model_type": "mistral", "vocab_size": 32000, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "sliding_window": 4096, "max_position_embeddings": 32768, "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "dtype": "float16",
}

#: Values drawn and written at a time (float16: 64 MB).
CHUNK_VALUES = 32 * 2**20

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}


def log(msg: str) -> None:
    print(f"[export_7b {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
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


def tensor_seed(seed: int, name: str) -> int:
    """The seed of one tensor's generator: ``--seed`` and the tensor's name."""
    return zlib.crc32(f"{seed}:{name}".encode())


def write_tensor(f: Any, name: str, numel: int, seed: int, std: float) -> None:
    """Draw ``numel`` float16 values of tensor ``name`` (norms N(1, 0.02), matrices N(0, std)) and write them to
    ``f`` in chunks of at most ``CHUNK_VALUES``."""
    import torch

    g = torch.Generator().manual_seed(tensor_seed(seed, name))
    mean, scale = (1.0, 0.02) if name.endswith("norm.weight") else (0.0, std)
    buf = torch.empty(min(numel, CHUNK_VALUES), dtype=torch.float16)
    for start in range(0, numel, CHUNK_VALUES):
        part = buf[:min(CHUNK_VALUES, numel - start)]
        part.normal_(mean, scale, generator=g)
        f.write(memoryview(part.numpy()))


def write_safetensors(path: Path, shapes: dict[str, tuple[int, ...]], seed: int, std: float) -> None:
    """A float16 safetensors file written streaming: the header, then each tensor's data chunk by chunk."""
    header, offset = {}, 0
    for name, shape in shapes.items():
        n = 2 * int(np.prod(shape))
        header[name] = {"dtype": "F16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape in shapes.items():
            write_tensor(f, name, int(np.prod(shape)), seed, std)


def make_checkpoint(folder: Path, layers: int, seed: int, std: float, shards: int = 3) -> int:
    """Write the synthetic checkpoint into ``folder``; returns its size in bytes."""
    cfg = dict(CONFIG, num_hidden_layers=layers)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    shapes = tensor_shapes(cfg)
    names = list(shapes)
    per = -(-len(names) // shards)
    weight_map, total = {}, 0
    for s in range(shards):
        part = names[s * per:(s + 1) * per]
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(folder / file, {n: shapes[n] for n in part}, seed, std)
        weight_map.update({n: file for n in part})
        total += (folder / file).stat().st_size
        log(f"checkpoint: {file} written ({total / 1e9:.2f} GB so far)")
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return total


def run_export(ckpt: Path, out: Path, target: str, dtype: str, quantize: str | None = None) -> dict[str, Any]:
    """Run ``mtx export`` in a child process; return its manifest and measured wall time / peak memory."""
    cmd = [sys.executable, "-m", "mtx", "export", str(ckpt), "-o", str(out), "--target", target, "--dtype", dtype,
           "--json", "--force"] + (["--quantize", quantize] if quantize else [])
    log(f"export: {' '.join(cmd[2:])}")
    run = benchlib.run_sampled(cmd, [ckpt.resolve(), out.resolve()], interval_s=0.25)
    if run.returncode:
        sys.stderr.write(run.stderr)
        raise SystemExit(run.returncode)
    wall, memory, peak = run.wall_s, run.memory, run.rusage.ru_maxrss * 1024  # Linux reports KiB
    log(f"export: {wall:.0f} s, peak RSS {peak / 2**30:.2f} GiB")
    return {
        "command": " ".join(cmd), "wall_s": round(wall, 1), "peak_rss_bytes": peak,
        "peak_rss_gib": round(peak / 2**30, 2),
        "memory": {**memory, "rule": "anonymous resident + mapped checkpoint/export files, sampled every 0.25 s"},
        **export_summary(json.loads(run.stdout))}


def export_summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """What the report gives of an export's manifest (``mtx.json``, or ``mtx export --json``)."""
    return {
        "target": manifest["target"], "dtype": manifest["dtype"],
        "attention_op": manifest["attention_op"], "fallbacks": manifest["fallbacks"], "weights": manifest["weights"],
        "output_bytes": sum(f["bytes"] for f in manifest["files"]),
        "quantization": None if manifest["quantization"] is None else {
            k: v for k, v in manifest["quantization"].items() if k != "tensors"},
    }


def run_bench(out: Path, threads: int, prompt_len: int, new_tokens: int, spin: bool = False) -> dict[str, Any]:
    """``mtx bench OUT --json`` in a child process, sampled from here (load included) and reaped with ``wait4``;
    ``spin``: ``--spin`` (ONNX Runtime's intra-op spin-wait; mtx's default is off)."""
    from mtx.runtime.memory import export_weight_roots

    cmd = [sys.executable, "-m", "mtx", "bench", str(out), "--threads", str(threads), "--prompt-len",
           str(prompt_len), "--new-tokens", str(new_tokens), "--json", "--spin" if spin else "--no-spin"]
    run = benchlib.run_sampled(cmd, export_weight_roots(out), interval_s=0.05)
    if run.returncode:
        return {"command": " ".join(cmd), "failed": run.stderr[-2000:]}
    usage = run.rusage
    return {"command": " ".join(cmd), "wall_s": round(run.wall_s, 1),
            "peak_rss_gib": round(usage.ru_maxrss * 1024 / 2**30, 2),
            "cpu_per_wall": round((usage.ru_utime + usage.ru_stime) / run.wall_s, 2),
            "whole_process_memory": run.memory, **json.loads(run.stdout)}


def kv_read_bytes(out: Path, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    """KV bytes one timed decode step reads, averaged over mtx bench's timed steps (the step feeding position
    ``prompt_len + k - 1`` attends ``min(prompt_len + k, window)`` positions, k = 1 .. new_tokens - 1): keys and
    values of every layer for each position attended."""
    from mtx.manifest import read_manifest

    manifest = read_manifest(out)
    cfg, plan = manifest.model_config, manifest.kv_plan
    per_layer_position = 2 * cfg.num_kv_heads * cfg.head_dim * ITEMSIZE[manifest.dtype]  # keys and values
    # the mean over the timed steps of the positions each layer attends (its effective window)
    means = [float(np.mean([min(prompt_len + k, plan.effective(l)) for k in range(1, new_tokens)] or [prompt_len]))
             for l in range(cfg.num_layers)]
    per_position = cfg.num_layers * per_layer_position
    mean = float(np.mean(means))
    return {"bytes": round(per_position * mean), "per_position": per_position, "mean_positions": mean,
            "kv_dtype": manifest.dtype}


def bench_report(out: Path, export: dict[str, Any], a: argparse.Namespace) -> dict[str, Any]:
    """``--bench-runs`` runs of mtx bench; decode against the bandwidth bound; memory against weights + KV."""
    runs, bandwidths = [], []
    for r in range(a.bench_runs):
        # the bound's bandwidth just before each run, under the same load of this shared machine; in a child
        # process: its 3 GiB buffer would otherwise become this process's RSS high-water mark
        bandwidths.append(benchlib.run_json(
            [sys.executable, "-c", "import json, sys; sys.path.insert(0, sys.argv[1]); import benchlib; "
             "print(json.dumps(benchlib.read_bandwidth(int(sys.argv[2]))))", str(Path(__file__).parent),
             str(a.threads)], "read bandwidth"))
        runs.append(run_bench(out, a.threads, a.prompt_len, a.new_tokens, a.spin))
        if "failed" in runs[-1]:
            return {"runs": runs, "failed": runs[-1]["failed"]}
        log(f"bench run {r + 1}/{a.bench_runs}: read bandwidth {bandwidths[-1]['gb_s']} GB/s "
            f"(cpu/wall {bandwidths[-1]['cpu_per_wall']}), decode {runs[-1]['decode_tokens_per_s']} tokens/s "
            f"(cpu/wall {runs[-1]['cpu_per_wall']}), memory {runs[-1]['memory_mb']} MiB, {runs[-1]['wall_s']} s")
    tps = [r["decode_tokens_per_s"] for r in runs]
    weights = benchlib.bytes_per_token(out)
    kv = kv_read_bytes(out, a.prompt_len, a.new_tokens)
    per_token = weights + kv["bytes"]
    bw = [b["gb_s"] for b in bandwidths]
    bandwidth = float(np.median(bw))
    bound = bandwidth * 1e9 / per_token
    decode = float(np.median(tps))
    ratios = [t / (b * 1e9 / per_token) for t, b in zip(tps, bw)]
    files = export["output_bytes"]
    kv_bytes = runs[0]["kv_bytes"]
    mib = 2**20

    def against(m: dict[str, Any]) -> dict[str, Any]:
        return {"memory_mb": m["memory_mb"], "anon_mb": m["anon_mb"], "mapped_weights_mb": m["mapped_weights_mb"],
                "rss_mb": m["rss_mb"], "ratio_to_weights_plus_kv": round(m["memory_mb"] * mib / (files + kv_bytes), 3),
                "over_weights_plus_kv_mb": round(m["memory_mb"] - (files + kv_bytes) / mib, 1)}

    decode_mem = max((r["memory"] for r in runs), key=lambda m: m["memory_mb"])
    whole = max((r["whole_process_memory"] for r in runs), key=lambda m: m["memory_mb"])
    return {
        "command": runs[0]["command"], "runs": len(runs), "threads": a.threads, "prompt_len": a.prompt_len,
        "new_tokens": a.new_tokens,
        "decode_tokens_per_s": round(decode, 2), "decode_tokens_per_s_min": min(tps), "decode_tokens_per_s_max": max(tps),
        "decode_tokens_per_s_samples": tps,
        "time_to_first_token_s": [r["time_to_first_token_s"] for r in runs],
        "bench_wall_s": [r["wall_s"] for r in runs],
        "bench_cpu_per_wall": [r["cpu_per_wall"] for r in runs],
        "bound": {
            "read_bandwidth_gb_s": round(bandwidth, 2), "read_bandwidth_gb_s_min": min(bw),
            "read_bandwidth_gb_s_max": max(bw), "read_bandwidth_runs": bandwidths,
            "weight_bytes_per_token": weights, "kv_read_bytes_per_token": kv, "bytes_per_token": per_token,
            "bound_tokens_per_s": round(bound, 2), "ratio_to_bound": round(decode / bound, 3),
            "ratio_to_bound_per_run": [round(x, 3) for x in ratios],
        },
        "memory": {
            "weights_bytes": files, "kv_bytes": kv_bytes, "weights_plus_kv_mb": round((files + kv_bytes) / mib, 1),
            "decode": {**against(decode_mem), "what": "mtx bench's in-process sampler, prefill + decode (max over runs)"},
            "whole_process": {**against(whole), "what": "the bench child sampled from here, load included (max over runs)"},
            "per_run": [{"decode_mb": r["memory_mb"], "decode_anon_mb": r["memory"]["anon_mb"],
                         "whole_mb": r["whole_process_memory"]["memory_mb"],
                         "whole_anon_mb": r["whole_process_memory"]["anon_mb"], "peak_rss_gib": r["peak_rss_gib"]}
                        for r in runs],
        },
        "last_run": runs[-1],
    }


def write_checkpoint(ckpt: Path, a: argparse.Namespace) -> dict[str, Any]:
    """``make_checkpoint`` in a child process (this script with ``--write-checkpoint``), so torch and the write
    buffer stay out of this process's RSS, which a child started by (v)fork + exec inherits as the start of its
    own ru_maxrss; its progress goes to stderr."""
    log(f"checkpoint: {a.layers} layers into {ckpt}")
    res = subprocess.run([sys.executable, __file__, "--write-checkpoint", "--workdir", str(a.workdir), "--layers",
                          str(a.layers), "--seed", str(a.seed), "--std", str(a.std)],
                         stdout=subprocess.PIPE, text=True, env=benchlib.child_env(), check=False)
    if res.returncode:
        raise SystemExit(f"writing the checkpoint failed (exit {res.returncode})")
    return {"bytes": json.loads(res.stdout), "layers": a.layers,
            "values": f"float16, per tensor torch.Generator(crc32('{a.seed}:' + name)): "
                      f"N(0, {a.std}) matrices, N(1, 0.02) norms"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/mtx-7b"), help="where the checkpoint and exports go")
    ap.add_argument("--run", action="append", metavar="TARGET:DTYPE[:QUANT]",
                    help="an export to measure (repeatable); default onnxruntime:float16; QUANT int4|int8")
    ap.add_argument("--layers", type=int, default=32, help="fewer layers for a quick run")
    ap.add_argument("--seed", type=int, default=0, help="seed of the checkpoint's values (with each tensor's name)")
    ap.add_argument("--std", type=float, default=0.02, help="standard deviation of the matrices' values")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and the exports")
    ap.add_argument("--reuse", action="store_true",
                    help="use the checkpoint and exports a --keep run left in --workdir (not timed again)")
    ap.add_argument("--bench", action="store_true", help="run mtx bench on each export")
    ap.add_argument("--bench-runs", type=int, default=3, help="mtx bench runs per export (median reported)")
    ap.add_argument("--threads", type=int, default=2, help="intra-op threads of mtx bench and of the bandwidth run")
    ap.add_argument("--spin", action="store_true", help="mtx bench --spin (intra-op threads spin-wait; default off)")
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--write-checkpoint", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()

    ckpt = a.workdir / "checkpoint"
    if a.write_checkpoint:
        print(json.dumps(make_checkpoint(ckpt, a.layers, a.seed, a.std)))
        return
    report: dict[str, Any] = {"loadavg_before": benchlib.loadavg()}
    t0 = time.time()
    index = ckpt / "model.safetensors.index.json"
    if a.reuse and index.is_file() and json.loads((ckpt / "config.json").read_text())["num_hidden_layers"] == a.layers:
        log(f"checkpoint: reusing {ckpt}")
        report["checkpoint"] = {"bytes": json.loads(index.read_text())["metadata"]["total_size"],
                                "reused": str(ckpt), "layers": a.layers}
    else:
        report["checkpoint"] = write_checkpoint(ckpt, a)
        report["checkpoint"]["write_s"] = round(time.time() - t0, 1)
    report["runs"] = []
    try:
        for spec in a.run or ["onnxruntime:float16"]:
            target, dtype, *quant = spec.split(":")
            out = a.workdir / f"export-{target}-{dtype}{''.join('-' + q for q in quant)}"
            if a.reuse and (out / "mtx.json").is_file():
                log(f"export: reusing {out}")
                run = {"reused": str(out), **export_summary(json.loads((out / "mtx.json").read_text()))}
            else:
                run = run_export(ckpt, out, target, dtype, quant[0] if quant else None)
            if a.bench:
                run["bench"] = bench_report(out, run, a)
            report["runs"].append(run)
            if not a.keep:
                shutil.rmtree(out)
    finally:
        if not a.keep:
            shutil.rmtree(a.workdir, ignore_errors=True)
    report["loadavg_after"] = benchlib.loadavg()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

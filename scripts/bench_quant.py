#!/usr/bin/env python
"""Quantised exports (docs/ops.md §7): quality, bytes per token and decode speed against float32 and
onnxruntime-genai. Prints JSON.

    python scripts/bench_quant.py [--work /tmp/mtx-bench] [--threads 2] [--repeats 3] [--skip quality|speed|genai]
                                  [--only NAME]...

Settings (``QUANTS``): float32, int8, and int4 with blocks of 32, 64 and 128, each with the defaults
(8-bit embedding table and lm_head), a 4-bit embedding table, and a 4-bit lm_head; and int4 block 128
with a float embedding table.

Bytes per token: the weight bytes one batch-1 decode step reads, from the export's graph
(:func:`benchlib.bytes_per_token`): every initializer whole, except the gathered tables (the embedding table
and the rotary cos/sin tables), of which one row. With tied embeddings the lm_head reads the table
whole, so it counts whole. Model bytes: the weight files and model.onnx.

Quality: perplexity of the built-in models (builtin:mistral, builtin:mixtral) on held-out Python
source (mtx's own sources; the models were trained on the standard library), for the float32
reference and the mtx exports float32 / int8 / int4 (onnxruntime target, ``mtx parity --quality``),
plus onnxruntime-genai's own int4 build (``-p int4 -e cpu``) of builtin:mistral, scored on the
same tokens.

Speed: the ~125M Mistral of scripts/bench_peers.py (float32 checkpoint, batch 1, prompt 128, 256
new tokens, greedy): decode tokens/s of mtx float32, int8 and int4 and genai int4, each system in a
process of its own, alternating, every run after a warm-up. The genai int4 graph is inspected
(which MatMuls are quantised, block size, accuracy level, lm_head) and reported.

The machine is shared and noisy (2 cores, other jobs running): medians are reported with every sample.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import benchlib
from benchlib import bytes_per_token, genai_build, genai_source

QUANTS = {"fp32": [], "int8": ["--quantize", "int8"],
          **{f"int4 block {b}{name}": ["--quantize", "int4", "--block-size", str(b), *extra]
             for b in (32, 64, 128) for name, extra in (("", []), (" embedding 4", ["--embedding-bits", "4"]),
                                                        (" lm_head 4", ["--lm-head-bits", "4"]))},
          "int4 block 128 float embedding": ["--quantize", "int4", "--block-size", "128", "--no-quantize-embedding"]}


def mtx_export(ckpt: str, out: Path, args: list[str]) -> Path:
    return benchlib.export_once(ckpt, out, args)


def folder_bytes(out: Path) -> int:
    return sum(f.stat().st_size for f in out.iterdir() if f.suffix in (".data", ".safetensors", ".onnx"))


def inspect_genai(out: Path) -> dict:
    """What genai's build quantised: MatMulNBits nodes (bits, block size, accuracy level), lm_head, float MatMuls."""
    import onnx

    model = onnx.load(str(out / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = lambda n: {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}  # noqa: E731
    lm = [n for n in model.graph.node if "lm_head" in n.name]
    zero_points = sum(len(n.input) > 3 and bool(n.input[3]) for n in nbits)
    return {"matmulnbits": len(nbits),
            "float_matmuls": sum(n.op_type == "MatMul" for n in model.graph.node),
            "settings": sorted({json.dumps({k: attrs(n).get(k) for k in ("bits", "block_size", "accuracy_level")})
                                for n in nbits}),
            "with_zero_points": zero_points,
            "lm_head": [f"{n.op_type} {json.dumps({k: attrs(n).get(k) for k in ('bits', 'block_size')})}"
                        for n in lm if n.op_type in ("MatMul", "MatMulNBits", "Gemm")],
            "ops": sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in model.graph.node})}


# --------------------------------------------------------------------------------------------------
# Quality


def genai_perplexity(model_dir: Path, ids: np.ndarray, chunk: int = 64) -> float:
    """Teacher-forced next-token perplexity of a genai model over ``ids``, ``chunk`` tokens per call."""
    import onnxruntime_genai as og

    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + 1, do_sample=False)
    gen = og.Generator(model, params)
    nll = []
    for start in range(0, len(ids) - 1, chunk):
        part = ids[start:min(start + chunk, len(ids) - 1)]
        gen.append_tokens(np.asarray([part], np.int32))
        logits = np.asarray(gen.get_output("logits"), np.float64).reshape(-1, np.asarray(gen.get_output("logits")).shape[-1])
        logits = logits[-len(part):]
        m = logits.max(-1, keepdims=True)
        lp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
        nll.append(-lp[np.arange(len(part)), ids[start + 1:start + 1 + len(part)]])
    return float(np.exp(np.concatenate(nll).mean()))


def selected(quants: dict[str, list[str]], only: list[str]) -> dict[str, list[str]]:
    """The settings named by ``--only`` (all when none), float32 always (the reference)."""
    unknown = [n for n in only if n not in quants]
    if unknown:
        raise SystemExit(f"--only: unknown setting {unknown[0]!r}; expected one of {', '.join(quants)}")
    return {n: a for n, a in quants.items() if not only or n in only or n == "fp32"}


def quality(work: Path, threads: int, skip_genai: bool, max_tokens: int, only: list[str] = ()) -> dict:
    from mtx.assets import resolve_checkpoint
    from mtx.parity.quality import held_out_text, run_quality
    from mtx.tokenizer import load_tokenizer

    results: dict = {}
    for name in ("mistral", "mixtral"):
        ckpt = f"builtin:{name}"
        rows = {}
        for q, args in selected(QUANTS, only).items():
            out = mtx_export(ckpt, work / f"builtin-{name}-{q.replace(' ', '-')}", args)
            r = run_quality(ckpt, out, None, max_tokens, threads=threads)
            rows["float32 reference"] = {"perplexity": round(r.reference_perplexity, 4)}
            rows[f"mtx {q}"] = {"perplexity": round(r.export_perplexity, 4),
                                "vs_float32": f"{(r.perplexity_ratio - 1) * 100:+.2f}%",
                                "top1_agreement": round(r.top1_agreement, 4), "weight_bytes": folder_bytes(out),
                                "bytes_per_token": bytes_per_token(out)}
            rows["tokens"] = r.tokens
        if name == "mistral" and not skip_genai:
            root = resolve_checkpoint(ckpt)
            src = genai_source(root, work, f"builtin-{name}")
            gout = genai_build(src, work / f"builtin-{name}-genai-int4", "int4", work, threads)
            tok = load_tokenizer(root)
            ids = np.asarray(tok.encode(held_out_text()).ids[:max_tokens], np.int64)
            ppl = genai_perplexity(gout, ids)
            ref = rows["float32 reference"]["perplexity"]
            rows["onnxruntime-genai int4"] = {"perplexity": round(ppl, 4), "vs_float32": f"{(ppl / ref - 1) * 100:+.2f}%",
                                              "graph": inspect_genai(gout)}
        results[name] = rows
    return results


# --------------------------------------------------------------------------------------------------
# Speed


def child(system: str, folder: Path, a: argparse.Namespace) -> None:
    prompt = benchlib.bench_prompt(128)
    run = benchlib.genai_decode_runner(folder, prompt, a.new_tokens) if system.startswith("genai") else \
        benchlib.mtx_decode_runner(folder, a.threads, prompt, a.new_tokens)
    print(json.dumps(benchlib.timed_twice(run)))


def speed(work: Path, a: argparse.Namespace) -> dict:
    ckpt = benchlib.make_checkpoint(work)
    folders = {f"mtx {q}": mtx_export(str(ckpt), work / f"mtx-125m-{q.replace(' ', '-')}", args)
               for q, args in selected(QUANTS, a.only).items()}
    if a.accuracy_level0:
        folders["mtx int4 accuracy_level 0"] = mtx_export(str(ckpt), work / "mtx-125m-int4-acc0",
                                                          ["--quantize", "int4", "--block-size", "32",
                                                           "--accuracy-level", "0"])
    graph = None
    if "genai" not in a.skip:
        src = genai_source(ckpt, work, "mistral-125m")
        folders["genai int4"] = genai_build(src, work / "genai-125m-int4", "int4", work, a.threads)
        graph = inspect_genai(folders["genai int4"])
    runs: dict[str, list] = {n: [] for n in folders}
    for _ in range(a.repeats):
        for name, folder in folders.items():
            r = benchlib.run_json([sys.executable, __file__, "--child", name, "--folder", folder, "--threads",
                                   a.threads, "--new-tokens", a.new_tokens], f"bench_quant: {name}")
            runs[name].append((r["ttft"], r["steps"], r["tokens"]))
    results = {}
    for name, rs in runs.items():
        s = benchlib.summarize(rs)
        s.pop("tokens")
        s["weight_bytes"] = folder_bytes(folders[name])
        if not name.startswith("genai"):
            s["bytes_per_token"] = bytes_per_token(folders[name])
        results[name] = s
    out = {"setup": {**benchlib.SHAPE, "batch": 1, "prompt_len": 128, "new_tokens": a.new_tokens,
                     "threads": a.threads, "repeats": a.repeats}, "loadavg_after": benchlib.loadavg(),
           "results": results}
    if graph:
        out["genai_int4_graph"] = graph
        g = results["genai int4"]["decode_tokens_per_s"]
        out["decode_ratio_to_genai_int4"] = {n: round(r["decode_tokens_per_s"] / g, 3) for n, r in results.items()}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(ap, work="/tmp/mtx-bench", prompt_len=None, new_tokens=256)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=2048, help="tokens of held-out text scored for perplexity")
    ap.add_argument("--accuracy-level0", action="store_true", help="also time an int4 export with accuracy_level 0")
    ap.add_argument("--skip", action="append", default=[], choices=["quality", "speed", "genai"])
    ap.add_argument("--only", action="append", default=[], metavar="NAME",
                    help="run only these settings of QUANTS (repeatable; float32 always runs)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a.child, a.folder, a)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    report: dict = {"machine": "2 shared CPU cores, other jobs running: numbers are noisy",
                    "loadavg_before": benchlib.loadavg()}
    if "quality" not in a.skip:
        report["quality"] = quality(a.work, a.threads, "genai" in a.skip, a.max_tokens, a.only)
    if "speed" not in a.skip:
        report["speed"] = speed(a.work, a)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""mtx against its peers (onnxruntime-genai, transformers, llama.cpp), side by side in one run. Prints JSON.

    python scripts/bench_peers.py [--work /tmp/mtx-bench] [--threads 2] [--new-tokens 256] [--repeats 3]
                                  [--model mistral-125m|mixtral-8x] [--quant fp32,int8,int4]
                                  [--systems mtx,genai,transformers,llamacpp]

Models (benchlib.MODELS, synthetic float32 checkpoints made once in --work):
- ``mistral-125m`` (issue #4): hidden 768, 12 layers, 12 heads, 4 KV heads, intermediate 2048, vocab 32000,
  window 256;
- ``mixtral-8x`` (issue #24): hidden 512, 8 layers, 8 heads, 4 KV heads, 8 experts top 2 of intermediate 1792,
  vocab 32000, window 256 (~214M parameters, ~66M read per token). onnxruntime-genai's builder has no Mixtral:
  genai is skipped for it (said in the JSON's notes).

Setup: batch 1, the same random 128-token prompt (benchlib.bench_prompt), 256 greedy new tokens, 2 threads. Each
system runs in a process of its own, a warm-up run then a timed one (time to first token, then each decode step);
the systems alternate, pair by pair, over --repeats. Medians are reported with every sample.

Quantisation pairs (--quant): mtx fp32 / int8 / int4 (``--quantize int4 --block-size 128``; int8 and int4 keep
mtx's defaults: 8-bit embedding table and lm_head) against llama.cpp F32 / Q8_0 / Q4_0 (llama-quantize's
defaults). onnxruntime-genai (its fp32 build) and transformers (eager, float32) run with fp32 only.

llama.cpp (``--systems ...,llamacpp``) is installed on first use into its own venv (--llamacpp-venv, default
build/peer-venvs/llamacpp; never the project's environment): the llama-cpp-python 0.3.36 sdist, its vendored
llama.cpp built with CMake (Release, native CPU flags, no web UI, no OpenSSL: llama-quantize, llama-server,
llama-bench), the binding built with the same flags, and convert_hf_to_gguf.py's requirements (CPU torch first).
Its GGUFs are made with its own tools, once, in --work/gguf: convert_hf_to_gguf.py --outtype f32 on a copy of the
checkpoint with a SentencePiece vocabulary of vocab_size pieces (benchlib.sentencepiece_vocab: the converter
refuses the synthetic word-level tokenizer; only ids are fed), then llama-quantize to Q8_0 and Q4_0. It is timed
through llama-cpp-python's ``Llama.eval``, token by token, argmax of the logits (scripts/llamacpp_child.py),
with llama.cpp's default KV cache (f16) and llama-cpp-python's default attention (no flash attention); the
window check also runs llama.cpp F32 with an f32 KV cache and transformers without the window (tokens only).

Memory, one rule for every system (mtx.runtime.memory): anonymous resident bytes + the bytes of the weight files
the process maps (the export folder, the .gguf, the genai folder, the checkpoint), sampled from this process every
50 ms while the child runs; the peak is reported with its parts. ``model_mb``: the bytes on disk of what the
system loads (the export folder's files, the .gguf, the genai folder).

Tokens: every system's greedy tokens are compared with mtx's of the same quantisation (``first_divergence``: the
first generated index where they part, null if none). llama.cpp runs Mistral and Mixtral without the sliding
window, so past the window (prompt 128 + 256 new > window 256) it attends to keys mtx and transformers no longer
see; ``window`` in the JSON says where that starts and what was observed: transformers with the window off
against mtx, and llama.cpp F32 with an f32 KV cache against transformers without the window (its default f16
cache can part from float32 references earlier, on rounding alone). Different quantisation schemes (mtx int4
block 128 vs Q4_0 block 32) part early on these random models, whose logits lie close together.

The bandwidth bound is the bytes of weights read per decoded token (float32, every matrix but the embedding table,
top_k / experts of the experts) divided by the machine's read bandwidth (``benchlib.read_bandwidth``: read-only
streaming over a 3 GiB buffer, one slice per thread on the benchmark's threads, median of 7 runs).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

import benchlib
from benchlib import MODELS, ROOT, make_checkpoint, summarize

QUANTS = ("fp32", "int8", "int4")
#: ``mtx export`` options of each quantisation.
MTX_EXPORT_ARGS = {"fp32": [], "int8": ["--quantize", "int8"], "int4": ["--quantize", "int4", "--block-size", "128"]}
#: llama.cpp's type of each quantisation (llama-quantize's names; F32 straight from the converter).
GGUF_TYPES = {"fp32": "F32", "int8": "Q8_0", "int4": "Q4_0"}
#: What each pair's members hold (weights; the KV cache is float32 in mtx, f16 in llama.cpp by default).
QUANT_NOTES = {
    "fp32": "mtx fp32: float32 weights (model.onnx.data); llama.cpp F32: float32 weights",
    "int8": "mtx int8: int8 blocks of 128 with a zero point (asymmetric), embedding and lm_head 8-bit; "
            "llama.cpp Q8_0: int8 blocks of 32, a scale each (symmetric), embedding and output Q8_0",
    "int4": "mtx int4: 4-bit blocks of 128 with a zero point, embedding and lm_head 8-bit (mtx's defaults); "
            "llama.cpp Q4_0: 4-bit blocks of 32, a scale each, embedding Q4_0, output Q6_K (llama-quantize's "
            "default for the output tensor)",
}
SYSTEMS = ("mtx", "genai", "transformers", "llamacpp")
#: Names in the JSON.
LABELS = {"mtx": "mtx", "genai": "onnxruntime-genai", "transformers": "transformers-eager", "llamacpp": "llama.cpp"}


# --------------------------------------------------------------------------------------------------
# llama.cpp: its own venv, installed on first use


#: The llama.cpp peer: llama-cpp-python (its Python binding), whose sdist vendors the llama.cpp it binds.
LLAMACPP_SPEC = "llama-cpp-python==0.3.36"
#: CMake flags of both llama.cpp builds (the tools and the binding): no web UI download, no OpenSSL; native CPU.
LLAMACPP_CMAKE = ("-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF")
LLAMACPP_TARGETS = ("llama-quantize", "llama-server", "llama-bench")
#: What convert_hf_to_gguf.py needs besides the vendored gguf-py (torch first and alone: the local CPU wheel).
LLAMACPP_CONVERT_REQS = ("numpy", "sentencepiece", "safetensors", "protobuf", "transformers==4.57.6")


@dataclass(frozen=True)
class LlamaCpp:
    """An installed llama.cpp peer: the venv's python (llama_cpp importable), the vendored llama.cpp source
    (convert_hf_to_gguf.py) and the folder of its built tools (llama-quantize, llama-server, llama-bench)."""

    python: Path
    source: Path
    bin: Path

    def tool(self, name: str) -> Path:
        return self.bin / name


def llamacpp_install(venv: Path) -> LlamaCpp:
    """llama.cpp's own venv ``venv``, installed there on first use (pip and build output on stderr; a stamp file
    once ready): the sdist of ``LLAMACPP_SPEC`` unpacked, its vendored llama.cpp built (``LLAMACPP_TARGETS``,
    Release, ``LLAMACPP_CMAKE``) in ``venv/llama.cpp-build``, the binding built from the same sdist with the same
    flags, and convert_hf_to_gguf.py's requirements (CPU torch 2.13.0 installed alone first, so nothing pulls a
    CUDA build). Never the project's own environment."""
    venv = Path(venv).resolve()
    py = venv / "bin" / "python"
    name, version = LLAMACPP_SPEC.split("==")
    source = venv / f"{name.replace('-', '_')}-{version}" / "vendor" / "llama.cpp"
    build = venv / "llama.cpp-build"
    peer = LlamaCpp(py, source, build / "bin")
    stamp = venv / ".mtx-peer-ready"
    if stamp.exists() and py.exists():
        return peer
    print(f"bench_peers: installing {LLAMACPP_SPEC} and building llama.cpp into {venv} (once; ~20 min on 2 cores)",
          file=sys.stderr)
    out = {"stdout": sys.stderr, "check": True}
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", venv], **out)
    sdist = venv / f"{name.replace('-', '_')}-{version}.tar.gz"
    if not sdist.exists():
        subprocess.run([py, "-m", "pip", "download", LLAMACPP_SPEC, "--no-deps", "--no-binary", ":all:", "-d", venv],
                       **out)
    if not source.exists():
        with tarfile.open(sdist) as tar:
            tar.extractall(venv, filter="data")
    jobs = {"CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL", "2")}
    env = {**os.environ, **jobs}
    subprocess.run(["cmake", "-S", source, "-B", build, "-DCMAKE_BUILD_TYPE=Release", *LLAMACPP_CMAKE], env=env,
                   **out)
    subprocess.run(["cmake", "--build", build, "--target", *LLAMACPP_TARGETS], env=env, **out)
    pip = [py, "-m", "pip", "install"]
    subprocess.run([*pip, "torch==2.13.0"], **out)  # the local CPU wheel, before anything could want torch
    subprocess.run([*pip, source / "gguf-py", *LLAMACPP_CONVERT_REQS], **out)
    subprocess.run([*pip, sdist], env={**env, "CMAKE_ARGS": " ".join(LLAMACPP_CMAKE)}, **out)
    got = subprocess.run([py, "-c", "import llama_cpp, torch; print(llama_cpp.__version__, torch.__version__)"],
                         check=True, capture_output=True, text=True).stdout.strip()
    if "+cpu" not in got.split()[1]:
        raise SystemExit(f"bench_peers: {venv} got torch {got.split()[1]}, not the CPU build")
    stamp.write_text(got + "\n")
    return peer


def gguf_source(ckpt: Path, work: Path, model: str) -> Path:
    """llama.cpp's converter's copy of ``ckpt`` (hard links), made once as ``work/{model}-gguf-src``: the word-level
    tokenizer files left out, a SentencePiece ``tokenizer.model`` of exactly vocab_size pieces in their place."""
    src = Path(work) / f"{model}-gguf-src"
    if not (src / "tokenizer.model").exists():
        if src.exists():
            for f in src.iterdir():
                f.unlink()
            src.rmdir()
        benchlib.linked_copy(ckpt, src, skip=["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"])
        vocab = json.loads((ckpt / "config.json").read_text())["vocab_size"]
        benchlib.sentencepiece_vocab(src / "tokenizer.model.tmp", vocab).rename(src / "tokenizer.model")
    return src


def make_gguf(peer: LlamaCpp, ckpt: Path, work: Path, model: str, quant: str, threads: int) -> Path:
    """The GGUF of ``model`` in ``quant``'s llama.cpp type, made once in ``work/gguf`` with llama.cpp's own tools:
    convert_hf_to_gguf.py --outtype f32, then llama-quantize (output on stderr)."""
    folder = Path(work) / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    f32 = folder / f"{model}-F32.gguf"
    if not f32.exists():
        print(f"bench_peers: converting {model} to {f32}", file=sys.stderr)
        tmp = f32.with_suffix(".tmp")
        subprocess.run([peer.python, peer.source / "convert_hf_to_gguf.py", gguf_source(ckpt, work, model),
                        "--outtype", "f32", "--outfile", tmp], check=True, stdout=sys.stderr)
        tmp.rename(f32)
    kind = GGUF_TYPES[quant]
    out = folder / f"{model}-{kind}.gguf"
    if not out.exists():
        print(f"bench_peers: quantising {f32} to {kind}", file=sys.stderr)
        tmp = out.with_suffix(".tmp")
        subprocess.run([peer.tool("llama-quantize"), f32, tmp, kind, str(threads)], check=True, stdout=sys.stderr,
                       stderr=sys.stderr)
        tmp.rename(out)
    return out


def mtx_export(ckpt: Path, work: Path, model: str, quant: str) -> Path:
    """The mtx export (onnxruntime target) of ``model`` in ``quant``, made once; the 125M Mistral's folders are
    those bench_cpp.py (fp32) and bench_quant.py (int8, int4 block 128) use."""
    if model == "mistral-125m":
        name = {"fp32": "mtx-ort", "int8": "mtx-125m-int8", "int4": "mtx-125m-int4-block-128"}[quant]
    else:
        name = f"mtx-{model}-{quant}"
    return benchlib.export_once(ckpt, Path(work) / name, ["--target", "onnxruntime", *MTX_EXPORT_ARGS[quant]])


# --------------------------------------------------------------------------------------------------
# The bandwidth bound


def weight_bytes(ckpt: Path) -> tuple[int, int]:
    """(bytes of all weights, bytes read per decoded token: everything but the embedding table, and of the
    experts top_k / experts)."""
    from mtx.models.checkpoint import Checkpoint

    cfg = json.loads((Path(ckpt) / "config.json").read_text())
    share = cfg.get("num_experts_per_tok", 1) / cfg.get("num_local_experts", 1)
    ck = Checkpoint(ckpt)
    total = per_token = 0.0
    for name, s in ck.sources.items():
        n = sum(r.nbytes for r in s.refs)
        total += n
        if name != "embed.weight":
            per_token += n * (share if ".moe.w" in name else 1)
    return int(total), int(per_token)


def bench_transformers(ckpt: Path, threads: int, prompt: list[int], new: int, window: bool = True) -> dict[str, Any]:
    """A warm-up on a short prompt, then one timed greedy run of transformers (eager attention, float32);
    ``window=False``: the checkpoint's sliding window turned off (full attention, as llama.cpp runs it)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    kw = {} if window else {"sliding_window": None}
    model = AutoModelForCausalLM.from_pretrained(ckpt, attn_implementation="eager", dtype=torch.float32, **kw).eval()
    ids = torch.tensor([prompt])
    with torch.no_grad():
        model.generate(ids[:, :16], max_new_tokens=4, do_sample=False)  # warm-up
        t0 = time.perf_counter()
        out = model(ids, use_cache=True)
        past = out.past_key_values
        tok = out.logits[:, -1:].argmax(-1)
        ttft = time.perf_counter() - t0
        tokens = [int(tok)]
        steps = []
        for _ in range(new - 1):
            s = time.perf_counter()
            out = model(tok, past_key_values=past, use_cache=True)
            past = out.past_key_values
            tok = out.logits[:, -1:].argmax(-1)
            steps.append(time.perf_counter() - s)
            tokens.append(int(tok))
    return {"ttft": ttft, "steps": steps, "tokens": tokens}


def child(system: str, a: argparse.Namespace) -> None:
    """mtx, genai or transformers in this process (folders made by the parent): prints benchlib.timed_twice's JSON."""
    prompt = benchlib.bench_prompt(a.prompt_len)
    if system == "transformers":
        print(json.dumps(bench_transformers(Path(a.child_path), a.threads, prompt, a.new_tokens, not a.no_window)))
        return
    if system == "mtx":
        run = benchlib.mtx_decode_runner(Path(a.child_path), a.threads, prompt, a.new_tokens, spin=a.spin)
    else:
        run = benchlib.genai_decode_runner(Path(a.child_path), prompt, a.new_tokens)
    print(json.dumps(benchlib.timed_twice(run)))


@dataclass(frozen=True)
class Entry:
    """One system in one quantisation: what it loads (``path``: an export or genai folder, a .gguf, a checkpoint)."""

    system: str
    quant: str
    path: Path
    spin: bool = False  # mtx only: ONNX Runtime's intra-op spin-wait (mtx's default is off)
    mmap: bool = True  # llama.cpp only: map the GGUF (its default) or read it into memory

    @property
    def label(self) -> str:
        q = GGUF_TYPES[self.quant] if self.system == "llamacpp" else self.quant
        return f"{LABELS[self.system]} {q}" + (" spin" if self.spin else "") + ("" if self.mmap else " no-mmap")

    def weight_roots(self) -> list[Path]:
        if self.path.is_dir() and (self.path / "mtx.json").exists():
            from mtx.runtime.memory import export_weight_roots

            return export_weight_roots(self.path)
        return [self.path.resolve()]


def in_child(e: Entry, a: argparse.Namespace, peer: LlamaCpp | None, no_window: bool = False, kv: str = "f16"
             ) -> tuple[dict[str, Any], dict[str, Any]]:
    """One timed run of ``e`` in a process of its own: (benchlib.timed_twice's JSON, its memory by the rule);
    ``no_window``: transformers with the sliding window off; ``kv``: llama.cpp's KV cache type."""
    what = f"bench_peers: {e.label}"
    if e.system == "llamacpp":
        assert peer is not None
        req = {"gguf": str(e.path), "threads": a.threads, "prompt": benchlib.bench_prompt(a.prompt_len),
               "new_tokens": a.new_tokens, "kv_type": kv, "mmap": e.mmap}
        env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
        return benchlib.run_json_sampled([peer.python, ROOT / "scripts" / "llamacpp_child.py"], what,
                                         e.weight_roots(), env=env, stdin=json.dumps(req))
    cmd = [sys.executable, __file__, "--child", e.system, "--child-path", e.path, "--threads", a.threads,
           "--prompt-len", a.prompt_len, "--new-tokens", a.new_tokens, "--work", a.work,
           *(["--no-window"] if no_window else []), *(["--spin"] if e.spin else [])]
    return benchlib.run_json_sampled(cmd, what, e.weight_roots())


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """The first index where two token lists part (the shorter's length if one is a prefix), None if equal."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def ratio(x: float, y: float) -> float | None:
    return round(x / y, 3) if y else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(ap, work="/tmp/mtx-bench", prompt_len=128, new_tokens=256)
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per system and quantisation, alternating")
    ap.add_argument("--model", choices=sorted(MODELS), default="mistral-125m", help="the synthetic checkpoint")
    ap.add_argument("--quant", default="fp32",
                    help="comma-separated quantisations of the mtx / llama.cpp pairs: fp32 (llama.cpp F32), "
                         "int8 (Q8_0), int4 (block 128; Q4_0). genai and transformers run with fp32 only")
    ap.add_argument("--systems", default="mtx,genai,transformers",
                    help="comma-separated systems: mtx, genai (onnxruntime-genai), transformers (eager), llamacpp "
                         "(llama.cpp through llama-cpp-python, installed on first use into --llamacpp-venv)")
    ap.add_argument("--skip", action="append", default=[], choices=["genai", "transformers"],
                    help="drop a system from --systems (kept for older command lines)")
    ap.add_argument("--llamacpp-venv", type=Path, default=ROOT / "build" / "peer-venvs" / "llamacpp",
                    help="llama.cpp's own venv and build (made on first use; ~20 min on 2 cores)")
    ap.add_argument("--mtx-spin", choices=["off", "on", "both"], default="off",
                    help="mtx with ONNX Runtime's intra-op spin-wait off (mtx's default), on (--spin; llama.cpp's "
                         "threads also spin while they wait), or both, each its own system")
    ap.add_argument("--llamacpp-mmap", choices=["on", "off", "both"], default="on",
                    help="llama.cpp with its GGUF mapped (its default) or read into memory (use_mmap=False). With "
                         "the file mapped, the weights it repacks for the CPU (Q4_0, Q8_0) are in anonymous memory "
                         "and their mapped originals still count by the memory rule; read in, they count once")
    ap.add_argument("--child", choices=["mtx", "genai", "transformers"], help=argparse.SUPPRESS)
    ap.add_argument("--spin", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--child-path", help=argparse.SUPPRESS)
    ap.add_argument("--no-window", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.child:
        child(a.child, a)
        return
    quants = [q for q in a.quant.split(",") if q]
    systems = [s for s in a.systems.split(",") if s and s not in a.skip]
    for q in quants:
        if q not in QUANTS:
            ap.error(f"--quant: {q!r} is not one of {', '.join(QUANTS)}")
    for s in systems:
        if s not in SYSTEMS:
            ap.error(f"--systems: {s!r} is not one of {', '.join(SYSTEMS)}")
    notes: list[str] = []
    ckpt = make_checkpoint(a.work, a.model)
    if "genai" in systems and a.model != "mistral-125m":
        systems.remove("genai")
        notes.append("onnxruntime-genai skipped: its model builder does not list Mixtral (MixtralForCausalLM) among "
                     "the architectures it builds")
    if "genai" in systems and importlib.util.find_spec("onnxruntime_genai") is None:
        systems.remove("genai")
        notes.append("onnxruntime-genai skipped: not installed in this environment (pip install -e '.[genai]')")
    peer = llamacpp_install(a.llamacpp_venv) if "llamacpp" in systems else None

    # Everything each system loads is made first, so children only load and time.
    entries: list[Entry] = []
    for q in quants:
        if "mtx" in systems:
            out = mtx_export(ckpt, a.work, a.model, q)
            entries += [Entry("mtx", q, out, spin) for spin in {"off": [False], "on": [True],
                                                                 "both": [False, True]}[a.mtx_spin]]
        if peer is not None:
            gguf = make_gguf(peer, ckpt, a.work, a.model, q, a.threads)
            entries += [Entry("llamacpp", q, gguf, mmap=m) for m in {"on": [True], "off": [False],
                                                                       "both": [True, False]}[a.llamacpp_mmap]]
        if q == "fp32" and "genai" in systems:
            src = benchlib.genai_source(ckpt, a.work, a.model)
            entries.append(Entry("genai", q, benchlib.genai_build(src, a.work / "genai-fp32-cpu", "fp32", a.work,
                                                                  a.threads)))
    # Each system runs in a process of its own (two ONNX Runtime sessions in one process compete through their
    # spinning thread pools on 2 cores), after a warm-up run; they alternate, so drifts of this shared machine's
    # speed hit all alike.
    runs: dict[str, list[benchlib.Run]] = {e.label: [] for e in entries}
    memory: dict[str, dict[str, Any]] = {}
    extra: dict[str, Any] = {}
    loads = []
    for rep in range(a.repeats):
        for e in entries:
            print(f"bench_peers: {e.label} (run {rep + 1}/{a.repeats})", file=sys.stderr)
            r, mem = in_child(e, a, peer)
            runs[e.label].append((r["ttft"], r["steps"], r["tokens"]))
            if e.label not in memory or mem["memory_mb"] > memory[e.label]["memory_mb"]:
                memory[e.label] = mem
            if "settings" in r:
                extra[e.label] = r["settings"]
        loads.append(benchlib.loadavg())
    if "transformers" in systems and "fp32" in quants:
        e = Entry("transformers", "fp32", ckpt)
        r, mem = in_child(e, a, peer)
        runs[e.label] = [(r["ttft"], r["steps"], r["tokens"])]
        memory[e.label] = mem
        entries.append(e)

    results: dict[str, dict[str, Any]] = {}
    tokens: dict[str, list[int]] = {}
    for e in entries:
        s = summarize(runs[e.label])
        tokens[e.label] = s.pop("tokens")
        mem = memory[e.label]
        s["decode_tokens_per_s_best"] = max(s["samples"]["decode_tokens_per_s"])
        results[e.label] = {**s, "model_mb": round(benchlib.disk_bytes(e.path) / 2**20, 1),
                            "memory_mb": mem["memory_mb"], "memory": mem,
                            **({"settings": extra[e.label]} if e.label in extra else {})}
    mtx_labels = {e.quant: e.label for e in reversed(entries) if e.system == "mtx"}  # spin off first
    for e in entries:
        ref = mtx_labels.get(e.quant)
        if e.system != "mtx" and ref is not None:
            results[e.label][f"first_divergence_from_mtx_{e.quant}"] = first_divergence(tokens[e.label], tokens[ref])
        if e.system == "mtx" and ref is not None and ref != e.label and tokens[e.label] != tokens[ref]:
            raise SystemExit(f"bench_peers: {e.label} and {ref} gave different tokens")
    pairs = {}
    for e, f in ((e, f) for e in entries for f in entries
                 if e.system == "mtx" and f.system == "llamacpp" and e.quant == f.quant):
        m, l = results[e.label], results[f.label]
        pairs[f"{e.label} / {f.label}"] = {
            "decode_ratio": ratio(m["decode_tokens_per_s"], l["decode_tokens_per_s"]),
            "decode_ratio_best": ratio(m["decode_tokens_per_s_best"], l["decode_tokens_per_s_best"]),
            "ttft_ratio": ratio(m["time_to_first_token_s"], l["time_to_first_token_s"]),
            "bytes_ratio": ratio(m["model_mb"], l["model_mb"]),
            "memory_ratio": ratio(m["memory_mb"], l["memory_mb"]),
        }
    total, per_token = weight_bytes(ckpt)
    bandwidth = benchlib.read_bandwidth(a.threads)
    bound = bandwidth["gb_s"] * 1e9 / per_token
    for r in results.values():
        r["ratio_to_fp32_bandwidth_bound"] = round(r["decode_tokens_per_s"] / bound, 3)
    cfg = json.loads((ckpt / "config.json").read_text())
    window = cfg.get("sliding_window")
    arch, shape = MODELS[a.model]
    report: dict[str, Any] = {
        "setup": {"model": a.model, "arch": arch, **shape, "dtype": "float32", "batch": 1,
                  "prompt_len": a.prompt_len, "new_tokens": a.new_tokens, "threads": a.threads,
                  "repeats": a.repeats, "weights_mb": round(total / 2**20, 1),
                  "bytes_read_per_token_mb": round(per_token / 2**20, 1)},
        "memory_bandwidth_gb_s": bandwidth["gb_s"], "memory_bandwidth": bandwidth,
        "fp32_bandwidth_bound_tokens_per_s": round(bound, 1),
        "results": results,
        "mtx_vs_llamacpp": pairs,
        "quantisations": {q: QUANT_NOTES[q] for q in quants},
        "loadavg": benchlib.loadavg(),
        "loadavg_after_each_repeat": loads,
    }
    if "onnxruntime-genai fp32" in results and "mtx fp32" in results:
        g, m = results["onnxruntime-genai fp32"], results["mtx fp32"]
        report["mtx_vs_genai"] = {"decode_ratio": ratio(m["decode_tokens_per_s"], g["decode_tokens_per_s"]),
                                  "ttft_ratio": ratio(m["time_to_first_token_s"], g["time_to_first_token_s"])}
    if window and peer is not None:
        # the first generated token whose forward pass sits at a position >= window: it would attend window + 1
        # keys without the window (token k comes from position prompt_len - 1 + k)
        first = window - a.prompt_len + 1
        report["window"] = {"sliding_window": window, "first_token_index_past_window": first if first > 0 else 0,
                            "applies": a.prompt_len + a.new_tokens > window}
        seen = {label: results[label].get("first_divergence_from_mtx_fp32") for label in results
                if label in ("llama.cpp F32", "transformers-eager fp32")}
        report["window"]["first_divergence_from_mtx_fp32"] = seen
        if "llama.cpp F32" in tokens and "transformers" in systems:
            # the check: transformers with the window off (full attention, tokens only) against llama.cpp F32
            print("bench_peers: transformers fp32 without the sliding window (tokens only)", file=sys.stderr)
            full, _ = in_child(Entry("transformers", "fp32", ckpt), a, peer, no_window=True)
            report["window"]["llama.cpp F32 first_divergence_from_transformers_without_window"] = first_divergence(
                tokens["llama.cpp F32"], full["tokens"])
            report["window"]["transformers_without_window first_divergence_from_mtx_fp32"] = first_divergence(
                full["tokens"], tokens["mtx fp32"]) if "mtx fp32" in tokens else None
            # llama.cpp's f16 KV cache rounds keys and values: with an f32 one its tokens show the window alone
            print("bench_peers: llama.cpp F32 with an f32 KV cache (tokens only)", file=sys.stderr)
            f32kv, _ = in_child(next(e for e in entries if e.label == "llama.cpp F32"), a, peer, kv="f32")
            report["window"]["llama.cpp F32 kv f32 first_divergence_from_transformers_without_window"] = \
                first_divergence(f32kv["tokens"], full["tokens"])
            report["window"]["llama.cpp F32 kv f32 first_divergence_from_mtx_fp32"] = first_divergence(
                f32kv["tokens"], tokens["mtx fp32"]) if "mtx fp32" in tokens else None
        w = report["window"]
        notes.append(f"llama.cpp ignores the sliding window (the GGUF has no window key; it runs {arch} with full "
                     f"attention), so its greedy tokens can part from mtx's and transformers' (which keep the "
                     f"window of {window}) from generated token {first} on (prompt {a.prompt_len} + "
                     f"{a.new_tokens} new {'>' if a.prompt_len + a.new_tokens > window else '<='} window {window}). Observed: llama.cpp F32 (f16 KV, as timed) parts "
                     f"from mtx fp32 at token {json.dumps(seen.get('llama.cpp F32'))}"
                     + (f"; transformers without the window parts from mtx fp32 at token "
                        f"{json.dumps(w['transformers_without_window first_divergence_from_mtx_fp32'])}; llama.cpp "
                        f"F32 with an f32 KV cache parts from transformers without the window at token "
                        f"{json.dumps(w['llama.cpp F32 kv f32 first_divergence_from_transformers_without_window'])} "
                        f"(null: never) and from mtx fp32 at token "
                        f"{json.dumps(w['llama.cpp F32 kv f32 first_divergence_from_mtx_fp32'])}"
                        if "llama.cpp F32 kv f32 first_divergence_from_mtx_fp32" in w else ""))
    if notes:
        report["notes"] = notes
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

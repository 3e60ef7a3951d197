"""What the benchmark scripts share (imported as a sibling module: the scripts run as ``python scripts/X.py``).

- the benchmark models: ``SHAPE`` (the ~125M Mistral of issue #4), ``MIXTRAL_SHAPE`` (a Mixtral of about the same
  bytes read per token), ``MODELS``, ``make_checkpoint`` (made once in ``--work``), ``export_once`` (``mtx export``
  into a folder, once), ``bench_prompt``, ``linked_copy`` (a peer's copy of a checkpoint), ``disk_bytes``;
- child processes that print JSON: ``run_json`` (run one, parse its JSON, fail with its stderr), ``run_json_sampled``
  (the same, its memory sampled from this process by mtx.runtime.memory's rule),
  ``child_env`` (PYTHONPATH with this checkout first), ``timed_twice`` (a warm-up run, then the timed one);
- timed greedy runs: ``mtx_decode_runner``, ``genai_decode_runner``, ``summarize``;
- onnxruntime-genai builds: ``genai_source``, ``genai_build``; llama.cpp's converter: ``sentencepiece_vocab``;
- the OpenAI load generator (scripts/load_openai.py is its command line): ``make_prompts``, ``run_load``,
  ``summarize_load``, ``offline_texts``, ``offline_outputs``; multi-turn clients: ``run_conversations``;
- ``loadavg``: the machine's load average, recorded with a figure;
- the bandwidth bound: ``read_bandwidth`` (read-only streaming over a buffer far larger than the L3, on the
  benchmark's threads) and ``bytes_per_token`` (the weight bytes an export's graph reads per decoded token);
- shared argparse options: ``add_common_args`` (``--work --threads --prompt-len --new-tokens``).

Everything heavy (mtx, torch, onnxruntime_genai, openai) is imported inside the function that needs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the scripts use this checkout's mtx, however they are started
    sys.path.insert(1, str(ROOT))

#: The benchmark model (issue #4): a ~125M-parameter Mistral-shaped float32 checkpoint.
SHAPE = dict(vocab=32000, hidden=768, layers=12, heads=12, kv_heads=4, intermediate=2048, window=256)
#: A Mixtral-shaped float32 checkpoint (issue #24 item 5): 8 experts, top 2, ~214M parameters of which ~66M are
#: read per token (the 125M Mistral reads ~100M).
MIXTRAL_SHAPE = dict(vocab=32000, hidden=512, layers=8, heads=8, kv_heads=4, intermediate=1792, window=256,
                     experts=8, top_k=2)
#: The benchmark models by name: (transformers architecture, shape).
MODELS: dict[str, tuple[str, dict[str, int]]] = {"mistral-125m": ("mistral", SHAPE),
                                                 "mixtral-8x": ("mixtral", MIXTRAL_SHAPE)}

#: (time to first token s, decode step times s, tokens) of one timed greedy run.
Run = tuple[float, list[float], list[int]]


# --------------------------------------------------------------------------------------------------
# Command line


def add_common_args(ap: argparse.ArgumentParser, *, work: str = "/tmp/mtx-bench", threads: int = 2,
                    prompt_len: int | None = 128, new_tokens: int = 256) -> argparse._ArgumentGroup:
    """``--work --threads [--prompt-len] --new-tokens`` (``prompt_len=None``: no ``--prompt-len``)."""
    g = ap.add_argument_group("benchmark")
    g.add_argument("--work", type=Path, default=Path(work), help="folder of the checkpoint and exports (made once)")
    g.add_argument("--threads", type=int, default=threads, help="intra-op threads")
    if prompt_len is not None:
        g.add_argument("--prompt-len", type=int, default=prompt_len)
    g.add_argument("--new-tokens", type=int, default=new_tokens)
    return g


# --------------------------------------------------------------------------------------------------
# Child processes


def child_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment with this checkout first on PYTHONPATH (children import the same mtx)."""
    path = os.environ.get("PYTHONPATH")
    return {**os.environ, "PYTHONPATH": str(ROOT) + (os.pathsep + path if path else ""), **(extra or {})}


def run_json(cmd: Sequence[str], what: str, cwd: Path | None = None, env: dict[str, str] | None = None) -> Any:
    """Run ``cmd`` (stdout captured), parse the JSON it prints: all of stdout, else its last line.

    A failing child ends the benchmark with ``what`` and the end of its stderr."""
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, check=False, cwd=cwd,
                         env=child_env() if env is None else env)
    return child_json(what, res.returncode, res.stdout, res.stderr)


def child_json(what: str, returncode: int, stdout: str, stderr: str) -> Any:
    """The JSON a finished child printed: all of stdout, else its last line. A failed child, or one that printed
    no JSON, ends the benchmark with ``what`` and the end of its output."""
    if returncode != 0:
        raise SystemExit(f"{what} failed (exit {returncode}):\n{stdout[-2000:]}{stderr[-3000:]}")
    try:
        return json.loads(stdout)
    except json.JSONDecodeError:
        lines = stdout.strip().splitlines()
        if not lines:
            raise SystemExit(f"{what} printed no JSON:\n{stderr[-3000:]}") from None
        return json.loads(lines[-1])


@dataclass
class SampledRun:
    """A finished child process sampled from this one (:func:`run_sampled`)."""

    stdout: str
    stderr: str
    returncode: int
    wall_s: float
    memory: dict[str, Any]  # mtx.runtime.memory's peak report
    rusage: Any  # os.wait4's resource usage of the child (ru_maxrss: KiB on Linux)


def run_sampled(cmd: Sequence[str], weight_roots: Sequence[Path], env: dict[str, str] | None = None,
                stdin: str | None = None, interval_s: float = 0.05) -> SampledRun:
    """Run ``cmd`` with its memory sampled from this process until it exits (mtx.runtime.memory's rule: anonymous
    resident bytes + mapped bytes of the files under ``weight_roots``, at its peak), then reap it with ``wait4``.
    ``stdin``: text written to the child's standard input."""
    import tempfile

    import psutil

    from mtx.runtime.memory import wait_sampling

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.TemporaryFile("w+") as inp:
        inp.write(stdin or "")
        inp.seek(0)
        t0 = time.time()
        proc = psutil.Popen([str(c) for c in cmd], stdin=inp, stdout=out, stderr=err, text=True,
                            env=child_env() if env is None else env)
        peak = wait_sampling(proc, weight_roots, interval_s=interval_s)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.time() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return SampledRun(out.read(), err.read(), proc.returncode, wall, peak.report(), usage)


def run_json_sampled(cmd: Sequence[str], what: str, weight_roots: Sequence[Path], env: dict[str, str] | None = None,
                     stdin: str | None = None, interval_s: float = 0.05) -> tuple[Any, dict[str, Any]]:
    """``run_json`` of a :func:`run_sampled` child: (its JSON, its memory report)."""
    r = run_sampled(cmd, weight_roots, env, stdin, interval_s)
    return child_json(what, r.returncode, r.stdout, r.stderr), r.memory


def timed_twice(run: Callable[[], Run]) -> dict[str, Any]:
    """A warm-up run, then a timed one: the JSON a benchmark child prints (``{"ttft", "steps", "tokens"}``)."""
    run()
    ttft, steps, tokens = run()
    return {"ttft": ttft, "steps": steps, "tokens": tokens}


def loadavg() -> dict[str, float]:
    """The 1/5/15-minute load averages now (the machine is shared: record them with every figure)."""
    one, five, fifteen = os.getloadavg()
    return {"1m": round(one, 2), "5m": round(five, 2), "15m": round(fifteen, 2)}


# --------------------------------------------------------------------------------------------------
# The bandwidth bound: decode tokens/s <= read bandwidth / bytes read per token


def l3_cache_bytes() -> int | None:
    """The size of the largest CPU cache (sysfs, else sysconf), None where neither says."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        unit = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        sizes.append(int(text.rstrip("KMG")) * unit)
    if not sizes:
        try:
            sizes.append(os.sysconf("SC_LEVEL3_CACHE_SIZE"))
        except (ValueError, OSError):
            pass
    return max(sizes) if sizes and max(sizes) > 0 else None


def read_bandwidth(threads: int, buffer_gib: float = 3.0, runs: int = 7) -> dict[str, Any]:
    """Read-only memory bandwidth, GB/s (1e9 bytes/s): ``threads`` Python threads each ``torch.sum`` one slice of
    a float32 buffer of ``buffer_gib`` GiB (far larger than the L3, so every run streams from DRAM; nothing is
    written but the sums; torch releases the GIL, and its intra-op pool is set to 1 thread so each slice is read
    by exactly one thread). One warm-up run, then ``runs`` timed ones: median, min and max, and the process's
    CPU time over wall time (about ``threads`` when every thread had a core; less on a busy machine). This is
    the one home of the bandwidth bound of the benchmark scripts."""
    import threading

    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        buf = torch.ones(int(buffer_gib * 2**30) // 4)  # written once here: every page resident before timing
        parts = buf.chunk(threads)

        def once() -> tuple[float, float]:
            workers = [threading.Thread(target=p.sum) for p in parts]
            t, c = time.perf_counter(), time.process_time()
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            wall = time.perf_counter() - t
            return buf.numel() * 4 / wall / 1e9, (time.process_time() - c) / wall

        once()
        samples = [once() for _ in range(runs)]
        del buf, parts
    finally:
        torch.set_num_threads(before)
    rates = [r for r, _ in samples]
    return {"gb_s": round(float(np.median(rates)), 2), "min": round(min(rates), 2), "max": round(max(rates), 2),
            "samples": [round(r, 2) for r in rates], "threads": threads,
            "cpu_per_wall": round(float(np.median([c for _, c in samples])), 2), "buffer_gib": buffer_gib,
            "l3_bytes": l3_cache_bytes(),
            "method": "torch.sum of one slice per thread over a float32 buffer (read-only), median of runs"}


#: Initializers read one row per token (GroupQueryAttention's rotary tables).
ROW_TABLES = ("rope_cos_cache", "rope_sin_cache")


def bytes_per_token(out: Path) -> int:
    """Weight bytes a batch-1 decode step reads, from the export's graph: each initializer whole (its external
    data length), but one row of a table that is only gathered from (the embedding's data, scales and zero
    points; the rotary tables), and ``k / E`` of the experts of a com.microsoft MoE / QMoE node (a token runs
    its top-k experts). KV reads are not included."""
    import onnx

    model = onnx.load(str(Path(out) / "model.onnx"), load_external_data=False)
    readers: dict[str, set[str]] = {}
    for node in model.graph.node:
        gathered = node.op_type in ("Gather", "GatherBlockQuantized")
        experts = node.op_type in ("MoE", "QMoE") and node.domain == "com.microsoft"
        k = next((a.i for a in node.attribute if a.name == "k"), 1)
        for i, name in enumerate(node.input):
            readers.setdefault(name, set()).add("row" if gathered and i != 1 else f"experts {k}" if experts and i >= 2
                                                else "whole")
    total = 0.0
    for t in model.graph.initializer:
        length = next((int(e.value) for e in t.external_data if e.key == "length"), len(t.raw_data))
        rows = t.dims[0] if t.dims else 1
        how = readers.get(t.name, set())
        if t.name in ROW_TABLES or how == {"row"}:
            total += length / rows
        elif len(how) == 1 and next(iter(how)).startswith("experts "):
            total += length * int(next(iter(how)).split()[1]) / rows
        else:
            total += length
    return round(total)


# --------------------------------------------------------------------------------------------------
# The benchmark model


def make_checkpoint(work: Path, model: str = "mistral-125m") -> Path:
    """A benchmark model of ``MODELS`` (4096 positions, seed 0) as a Hugging Face checkpoint, made once in
    ``work/model`` (the default: the ~125M Mistral of ``SHAPE``)."""
    from mtx import synthetic_checkpoints as mk

    arch, shape = MODELS[model]
    ckpt = Path(work) / model
    if not (ckpt / "config.json").exists():
        mk.make_hf(ckpt, arch, max_positions=4096, init_std=0.02, seed=0, **shape)
    return ckpt


def linked_copy(ckpt: Path, dst: Path, skip: Sequence[str] = ()) -> Path:
    """``dst`` made as a copy of the checkpoint folder ``ckpt`` (hard links where it can), less the files named in
    ``skip``: a peer's own view of a checkpoint, with files added or edited without touching ``ckpt``."""
    dst.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.name not in skip and f.is_file():
            try:
                os.link(f, dst / f.name)
            except OSError:
                (dst / f.name).write_bytes(f.read_bytes())
    return dst


def disk_bytes(path: Path) -> int:
    """Bytes on disk of a file, or of the files of a folder (not recursive): what a system loads."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.iterdir() if f.is_file())


def export_once(ckpt: Path | str, out: Path, args: Sequence[str] = ("--target", "onnxruntime")) -> Path:
    """``mtx export ckpt -o out --force *args`` in a child process, unless ``out`` already holds an export."""
    out = Path(out)
    if not (out / "mtx.json").exists():
        subprocess.run([sys.executable, "-m", "mtx", "export", str(ckpt), "-o", str(out), "--force", *args],
                       check=True, stdout=subprocess.DEVNULL, env=child_env())
    return out


def bench_prompt(length: int, seed: int = 0) -> list[int]:
    """The random prompt every system of a benchmark decodes from."""
    return np.random.default_rng(seed).integers(3, SHAPE["vocab"], length).tolist()


# --------------------------------------------------------------------------------------------------
# Timed greedy runs


def mtx_decode_runner(out: Path, threads: int, prompt: list[int], new: int, spin: bool | None = None
                      ) -> Callable[[], Run]:
    """A function timing one greedy generation of the mtx export ``out`` (mtx.runtime); ``spin``: ONNX
    Runtime's intra-op spin-wait (None: mtx.load's default)."""
    import mtx.runtime

    gen = mtx.runtime.load(out, threads=threads, **({} if spin is None else {"spin": spin}))

    def run() -> Run:
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


def genai_decode_runner(folder: Path, prompt: list[int], new: int) -> Callable[[], Run]:
    """A function timing one greedy generation of onnxruntime-genai's model in ``folder``."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))

    def run() -> Run:
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


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Medians over repeated timed runs (each after its own warm-up run), with the samples and the last tokens."""
    ttfts = [r[0] for r in runs]
    tps = [len(r[1]) / sum(r[1]) for r in runs]
    return {"decode_tokens_per_s": round(float(np.median(tps)), 1),
            "time_to_first_token_s": round(float(np.median(ttfts)), 4),
            "decode_step_ms_median": round(1000 * float(np.median([np.median(r[1]) for r in runs])), 3),
            "samples": {"decode_tokens_per_s": [round(x, 1) for x in tps],
                        "time_to_first_token_s": [round(x, 4) for x in ttfts]},
            "tokens": runs[-1][2]}


# --------------------------------------------------------------------------------------------------
# onnxruntime-genai builds


def genai_source(ckpt: Path, work: Path, name: str) -> Path:
    """A copy of ``ckpt`` (hard links) whose config.json declares every layer sliding (genai's builder keeps the
    window only when ``layer_types = ["sliding_attention"] * n_layers``), made once as ``work/{name}-genai-src``."""
    src = Path(work) / f"{name}-genai-src"
    if not src.exists():
        linked_copy(ckpt, src, skip=["config.json"])
        cfg = json.loads((ckpt / "config.json").read_text())
        if cfg.get("sliding_window"):
            cfg["layer_types"] = ["sliding_attention"] * cfg["num_hidden_layers"]
        (src / "config.json").write_text(json.dumps(cfg, indent=2))
    return src


def genai_build(src: Path, out: Path, precision: str, work: Path, threads: int) -> Path:
    """onnxruntime-genai's builder (``-p precision -e cpu``) into ``out``, once, with ``threads`` intra-op threads."""
    if not (out / "genai_config.json").exists():
        res = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(src), "-o",
                              str(out), "-p", precision, "-e", "cpu", "-c", str(Path(work) / "genai-cache")],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
        if res.returncode != 0:
            raise SystemExit(f"onnxruntime-genai's builder failed on {src}:\n{res.stderr[-3000:]}")
        gc = json.loads((out / "genai_config.json").read_text())
        so = gc["model"]["decoder"].setdefault("session_options", {})
        so["intra_op_num_threads"] = threads
        so["inter_op_num_threads"] = 1
        (out / "genai_config.json").write_text(json.dumps(gc, indent=2))
    return out


# --------------------------------------------------------------------------------------------------
# llama.cpp's converter


def sentencepiece_vocab(path: Path, vocab_size: int) -> Path:
    """A SentencePiece model file of exactly ``vocab_size`` pieces at ``path``: ``<unk>``, ``<s>``, ``</s>``, the 256
    byte pieces ``<0x00>``..``<0xFF>``, then filler pieces ``tok{i}``. llama.cpp's convert_hf_to_gguf.py refuses
    the synthetic checkpoints' word-level tokenizer.json; this vocabulary it accepts, and the benchmarks feed token
    ids, so only the count matters."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    if vocab_size < 3 + 256:
        raise ValueError(f"vocab_size {vocab_size} < 259 (3 special pieces and 256 byte pieces)")
    T = pb.ModelProto.SentencePiece.Type
    m = pb.ModelProto()
    m.trainer_spec.model_type = pb.TrainerSpec.BPE
    m.trainer_spec.vocab_size = vocab_size
    m.trainer_spec.byte_fallback = True
    m.trainer_spec.unk_id, m.trainer_spec.bos_id, m.trainer_spec.eos_id, m.trainer_spec.pad_id = 0, 1, 2, -1
    m.normalizer_spec.name = "identity"
    m.normalizer_spec.add_dummy_prefix = True
    pieces = [("<unk>", T.UNKNOWN), ("<s>", T.CONTROL), ("</s>", T.CONTROL)]
    pieces += [(f"<0x{b:02X}>", T.BYTE) for b in range(256)]
    pieces += [(f"tok{i}", T.NORMAL) for i in range(vocab_size - len(pieces))]
    for i, (piece, kind) in enumerate(pieces):
        p = m.pieces.add()
        p.piece, p.type, p.score = piece, kind, 0.0 if kind != T.NORMAL else -float(i)
    Path(path).write_bytes(m.SerializeToString())
    return Path(path)


# --------------------------------------------------------------------------------------------------
# OpenAI load generator (N concurrent streaming clients; scripts/load_openai.py is its command line)


@dataclass
class Result:
    prompt: int
    t_sent: float
    chunk_times: list[float] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    completion_tokens: int | None = None
    error: str | None = None


def make_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return rng.integers(3, vocab, size=(n, length)).tolist()


async def _one(client: Any, model: str, prompt: list[int], index: int, max_tokens: int) -> Result:
    res = Result(index, time.perf_counter())
    try:
        stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                                 stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True})
        async for chunk in stream:
            now = time.perf_counter()
            if chunk.usage is not None:
                res.completion_tokens = chunk.usage.completion_tokens
            for choice in chunk.choices:
                if choice.text:
                    res.chunk_times.append(now)
                    res.text += choice.text
                res.finish_reason = choice.finish_reason or res.finish_reason
    except Exception as e:  # noqa: BLE001 - every failure is counted and reported
        res.error = f"{type(e).__name__}: {e}"
    return res


async def run_load(url: str, model: str, prompts: list[list[int]], clients: int, requests: int, duration: float,
                   max_tokens: int) -> tuple[list[Result], float, float]:
    """Results of up to ``requests`` requests by ``clients`` concurrent clients within ``duration`` s."""
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=600,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=clients + 4)))
    results: list[Result] = []
    counter = iter(range(requests))
    t0 = time.perf_counter()
    deadline = t0 + duration

    async def worker() -> None:
        for i in counter:
            if time.perf_counter() > deadline:
                return
            results.append(await _one(client, model, prompts[i % len(prompts)], i % len(prompts), max_tokens))

    await asyncio.gather(*(worker() for _ in range(clients)))
    await client.close()
    return results, t0, time.perf_counter()


async def run_conversations(url: str, model: str, conversations: list[list[list[int]]], max_tokens: int
                            ) -> tuple[list[list[Result]], float, float]:
    """All ``conversations`` at once, each a client sending its turns (whole prompts, token ids) one after
    another, each turn once the previous answer has streamed in. ``Result.prompt`` is ``c * turns + t``."""
    import httpx
    import openai

    client = openai.AsyncOpenAI(base_url=url.rstrip("/") + "/v1", api_key="none", max_retries=0, timeout=1200,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=len(conversations) + 4)))

    async def conversation(c: int, turns: list[list[int]]) -> list[Result]:
        return [await _one(client, model, prompt, c * len(turns) + t, max_tokens) for t, prompt in enumerate(turns)]

    t0 = time.perf_counter()
    results = await asyncio.gather(*(conversation(c, turns) for c, turns in enumerate(conversations)))
    t1 = time.perf_counter()
    await client.close()
    return list(results), t0, t1


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarize_load(results: list[Result], t0: float, t1: float, max_tokens: int,
                   expected: dict[int, str] | None) -> dict[str, Any]:
    """Throughput, aggregate decode rate while every request streamed, TTFT and inter-token p50/p99, errors."""
    ok = [r for r in results if r.error is None]
    incomplete = [r for r in ok if r.finish_reason != "length" or r.completion_tokens != max_tokens]
    mismatched = [r for r in ok if expected is not None and r.text != expected[r.prompt]]
    ttft = [r.chunk_times[0] - r.t_sent for r in ok if r.chunk_times]
    itl = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tokens = sum(r.completion_tokens or 0 for r in ok)
    # decode rate while every request was streaming: chunks between the last first-chunk and the first last-chunk
    started = [r.chunk_times[0] for r in ok if r.chunk_times]
    ended = [r.chunk_times[-1] for r in ok if r.chunk_times]
    agg = None
    if started and ended and min(ended) > max(started):
        lo, hi = max(started), min(ended)
        n = sum(sum(1 for t in r.chunk_times if lo < t <= hi) for r in ok)
        agg = round(n / (hi - lo), 1)
    return {
        "requests": len(results),
        "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if r.error})[:3],
        "incomplete": len(incomplete),
        "checked_against_offline": expected is not None,
        "mismatched": len(mismatched),
        "wall_s": round(t1 - t0, 3),
        "throughput_tokens_per_s": round(tokens / (t1 - t0), 1),
        "aggregate_decode_tokens_per_s": agg,
        "ttft_s": {"p50": _pct(ttft, 50), "p99": _pct(ttft, 99)},
        "inter_token_latency_s": {"p50": _pct(itl, 50), "p99": _pct(itl, 99)},
    }


def offline_outputs(export: str, prompts: list[list[int]], max_tokens: int,
                    threads: int | None) -> tuple[dict[int, list[int]], dict[int, str]]:
    """Each prompt's greedy tokens and text from ``Generator.generate`` of the export run alone in this process."""
    import mtx.runtime

    gen = mtx.runtime.load(export, threads=threads)
    tokens = {i: gen.generate([p], max_new_tokens=max_tokens, stop_token_ids=[])[0] for i, p in enumerate(prompts)}
    return tokens, {i: gen.decode(t) for i, t in tokens.items()}


def offline_texts(export: str, prompts: list[list[int]], max_tokens: int, threads: int | None) -> dict[int, str]:
    """Each prompt's greedy text from ``Generator.generate`` of the export run alone in this process."""
    return offline_outputs(export, prompts, max_tokens, threads)[1]

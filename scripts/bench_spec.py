#!/usr/bin/env python
"""Prompt-lookup speculative decoding (issue 21) against plain decoding, on the 125M Mistral of
scripts/bench_peers.py. Prints JSON.

    python scripts/bench_spec.py [--work /tmp/mtx-bench-serve] [--threads 2] [--new-tokens 256]
                                 [--ks 2,4,8] [--random-ks 4] [--rounds 3] [--server]

Setup: the checkpoint of bench_peers.py (made once in --work), exported once with ``--max-position 8192``
(the copy workload's prompt is ~6,400 tokens, past the checkpoint's 4,096 RoPE positions; the window is
256, so the KV buffer stays 256 slots). Batch 1, 2 threads, greedy, ``stop_token_ids=[]``.

Workloads (each timed run in the same process, systems alternating within each round):
* ``copy_greedy``: an answer that copies a span of its prompt, built from the project's own sources. The
  text of mtx/runtime/*.py is split into words as the bench model's word-level tokenizer splits text
  (``\\w+|[^\\w\\s]+``), and each distinct word gets an id in order of first appearance (the bench
  tokenizer knows only ``w3 w4 ...``, so the text itself would be all ``<unk>``). As
  tests/test_prefix_spec.py ``copy_workload`` does: ``prefix`` = the first ``--prefix-len`` words (at
  least the receptive field ``L(W-1)+1`` = 3,061 tokens), ``out`` = the model's own greedy continuation
  of it, prompt = ``prefix + out + prefix``: the random-weight model answers ``out`` again, which prompt
  lookup finds in the prompt. A random-weight model's greedy text soon repeats a short cycle, so the
  latest earlier occurrence of the last n-gram is usually in the answer itself, a few tokens back, and
  drafts are as short as the cycle (``distinct_tokens_in_out`` and the drafted counts show it).
* ``copy_sampled_t1``: the same with ``out`` sampled at temperature 1 (seed 0) and the answer sampled
  with the same seed (the same random draws, so it copies ``out``): a copied span that does not repeat
  itself, so drafts are full length.
* ``random_greedy`` / ``random_sampled_t1``: a random 128-token prompt, greedy (the random-weight model's
  cycles), and sampled at temperature 1 (seed 0), where drafts almost never match: the cost of trying
  (back-off).

Each run is one ``Generator.core(1)`` request (the serving engine's core); the prompt's prefill is mostly
taken from the in-process prefix cache after the first run, and decode tokens/s is measured from the first
token to the last (``new_tokens - 1`` tokens), so the figure is decoding only. Tokens of every speculative
run are checked equal to plain decoding's (reported). Also reported: acceptance (accepted / drafted), the
verification calls, and a profile of one decode call, one verification call of k+1 tokens and a rollback.

``--server``: one server-level figure, `mtx serve` on the same export, the copy prompt streamed with and
without ``speculative`` (alternating), decode tokens/s from the first streamed chunk to the last.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import benchlib

ROOT = benchlib.ROOT
MODEL = "mistral-125m"


def export_once(work: Path) -> Path:
    return benchlib.export_once(benchlib.make_checkpoint(work), work / "mtx-ort-pos8k",
                                ["--target", "onnxruntime", "--max-position", "8192"])


def source_tokens(n: int, vocab: int, files: str = "mtx/runtime/*.py") -> tuple[list[int], dict[str, Any]]:
    """The first ``n`` words of this checkout's ``files`` (sorted, concatenated) as ids: each distinct word
    an id in order of first appearance (3, 4, ...; wrapped below ``vocab``)."""
    import hashlib

    paths = sorted(ROOT.glob(files))
    text = "\n".join(p.read_text() for p in paths)
    words = re.findall(r"\w+|[^\w\s]+", text)
    if len(words) < n:
        raise SystemExit(f"{files}: only {len(words)} words, {n} wanted")
    ids: dict[str, int] = {}
    out = [ids.setdefault(w, 3 + len(ids) % (vocab - 3)) for w in words[:n]]
    return out, {"files": files, "words": n, "distinct_words": len(ids),
                 "text_sha256": hashlib.sha256(" ".join(words[:n]).encode()).hexdigest()[:16]}


# --------------------------------------------------------------------------------------------------
# In-process child


def timed_core_run(gen: Any, prompt: list[int], new: int, spec: dict | None, **opts: Any) -> dict[str, Any]:
    """One request through ``gen.core(1)``: tokens, decode tokens/s (first token to last), spec stats."""
    core = gen.core(1)
    core.add(gen.request(prompt, new, stop_token_ids=[], speculative=spec, **opts))
    tokens: list[int] = []
    t0 = time.perf_counter()
    first = last = None
    while core.has_unfinished():
        outs = core.step()
        now = time.perf_counter()
        for o in outs:
            if o.token is not None:
                tokens.append(o.token)
                if first is None:
                    first = now
                last = now
    st = core.spec_stats
    return {"tokens": tokens, "ttft_s": first - t0, "decode_tokens_per_s": (len(tokens) - 1) / (last - first),
            "steps": core.steps, "verifications": st.verifications, "drafted": st.drafted, "accepted": st.accepted}


def compare(gen: Any, prompt: list[int], new: int, ks: list[int], rounds: int, **opts: Any) -> dict[str, Any]:
    """Plain and speculative (each k) runs alternating over ``rounds`` (after one warm-up run of each)."""
    systems = ["plain"] + [f"ngram_k{k}" for k in ks]
    specs = {"plain": None, **{f"ngram_k{k}": {"method": "ngram", "num_tokens": k} for k in ks}}
    runs: dict[str, list] = {s: [] for s in systems}
    for s in systems:  # warm-up: fills the prefix cache, plans ORT's kernels for each call size
        timed_core_run(gen, prompt, min(new, 32), specs[s], **opts)
    for r in range(rounds):
        for s in systems if r % 2 == 0 else systems[::-1]:
            res = timed_core_run(gen, prompt, new, specs[s], **opts)
            res["loadavg"] = benchlib.loadavg()
            runs[s].append(res)
    want = runs["plain"][0]["tokens"]
    plain_tps = float(np.median([x["decode_tokens_per_s"] for x in runs["plain"]]))
    prefill_steps = runs["plain"][-1]["steps"] - (len(want) - 1)  # plain decoding: one call per token after the first
    out: dict[str, Any] = {}
    for s in systems:
        rs = runs[s]
        tps = float(np.median([x["decode_tokens_per_s"] for x in rs]))
        last = rs[-1]
        out[s] = {"decode_tokens_per_s": round(tps, 1),
                  "ratio_vs_plain": round(tps / plain_tps, 3),
                  "same_tokens_as_plain": all(x["tokens"] == want for x in rs),
                  "verifications": last["verifications"], "drafted": last["drafted"], "accepted": last["accepted"],
                  "acceptance_rate": round(last["accepted"] / last["drafted"], 3) if last["drafted"] else None,
                  "samples_decode_tokens_per_s": [round(x["decode_tokens_per_s"], 1) for x in rs],
                  "loadavg": [x["loadavg"] for x in rs]}
        calls = last["steps"] - prefill_steps
        out[s]["decode_calls"] = calls
        out[s]["tokens_per_decode_call"] = round((len(want) - 1) / calls, 3)
    out["best"] = max((s for s in systems if s != "plain"), key=lambda s: out[s]["decode_tokens_per_s"])
    out["plain_tokens"] = want
    return out


def profile(gen: Any, prompt: list[int], ks: list[int], reps: int = 20) -> dict[str, Any]:
    """Where the time goes, at the copy prompt's end: median ms of one decode call, and for each k of one
    verification call of k+1 tokens (with the positions it saves first) and of the rollback after it when
    every draft is rejected (the cycle of a failed draft: the row then goes on one position later)."""
    from mtx.runtime import speculative

    be = gen.backend
    sess = gen.session()
    sess.append(prompt)
    state, pos = sess._state, sess.position  # noqa: SLF001 - a benchmark's look inside
    tok = prompt[-1]
    times: dict[str, list[float]] = {"decode_call_ms": []}
    saved: dict[int, int] = {}
    for _ in range(reps):  # interleaved, so that the machine's drifts hit every figure alike
        t = time.perf_counter()
        be.run(state, slice(0, 1), np.asarray([[tok]]), np.asarray([pos]), last_only=True)
        times["decode_call_ms"].append(time.perf_counter() - t)
        pos += 1
        for k in ks:
            t = time.perf_counter()
            v = speculative.verify(be, state, 0, pos, tok, prompt[:k])
            t1 = time.perf_counter()
            speculative.rollback(be, state, 0, v, 0)
            times.setdefault(f"k{k}_verify_call_ms", []).append(t1 - t)
            times.setdefault(f"k{k}_rollback_all_rejected_ms", []).append(time.perf_counter() - t1)
            saved[k] = max(saved.get(k, 0), len(v.saved[0]) if v.saved else 0)
            pos += 1
    res = {name: round(1000 * float(np.median(ts)), 3) for name, ts in times.items()}
    res["positions_saved_per_verification"] = {f"k{k}": n for k, n in saved.items()}
    res["verify_call_over_decode_call"] = {f"k{k}": round(res[f"k{k}_verify_call_ms"] / res["decode_call_ms"], 3)
                                           for k in ks}
    return res


def child(a: argparse.Namespace) -> None:
    import mtx.runtime

    out = export_once(a.work)
    gen = mtx.runtime.load(out, threads=a.threads)  # prefill_chunk 256 = W: the prefix cache is on
    V = gen.config.vocab_size
    ks = [int(k) for k in a.ks.split(",")]
    L, W = gen.config.num_layers, gen.backend.window
    field = L * (W - 1) + 1
    prefix, src = source_tokens(max(a.prefix_len, field), V)
    report: dict[str, Any] = {"copy_source": src, "receptive_field": field}
    prompt = None
    for name, opts in (("copy_greedy", {}), ("copy_sampled_t1", {"temperature": 1.0, "seed": 0})):
        t = time.perf_counter()
        out_tokens = gen.generate([prefix], a.new_tokens, stop_token_ids=[], **opts)[0]
        p = prefix + out_tokens + prefix
        prompt = prompt or p
        rep: dict[str, Any] = {"prompt_len": len(p), "setup_s": round(time.perf_counter() - t, 1),
                               "distinct_tokens_in_out": len(set(out_tokens))}
        cmp = compare(gen, p, a.new_tokens, ks, a.rounds, **opts)
        answer = cmp.pop("plain_tokens")
        rep["answer_tokens_equal_to_out"] = f"{sum(x == y for x, y in zip(answer, out_tokens))}/{len(answer)}"
        rep.update(cmp)
        report[name] = rep
    rnd = benchlib.bench_prompt(128, seed=1)
    for name, opts in (("random_greedy", {}), ("random_sampled_t1", {"temperature": 1.0, "seed": 0})):
        report[name] = compare(gen, rnd, a.new_tokens, [int(k) for k in a.random_ks.split(",")], a.rounds, **opts)
        report[name].pop("plain_tokens")
    if not a.no_profile:
        report["profile_at_copy_prompt_end"] = profile(gen, prompt, ks)
    report["prompt_for_server"] = prompt
    print(json.dumps(report))


# --------------------------------------------------------------------------------------------------
# Server figure


async def _stream(url: str, prompt: list[int], new: int, spec: dict | None) -> dict[str, Any]:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    extra: dict[str, Any] = {"ignore_eos": True}
    if spec:
        extra["speculative"] = spec
    t0 = time.perf_counter()
    times, text, n = [], "", None
    stream = await client.completions.create(model=MODEL, prompt=prompt, max_tokens=new, temperature=0, stream=True,
                                             stream_options={"include_usage": True}, extra_body=extra)
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.usage is not None:
            n = chunk.usage.completion_tokens
        for c in chunk.choices:
            if c.text:
                times.append(now)
                text += c.text
    await client.close()
    return {"text": text, "ttft_s": times[0] - t0, "decode_tokens_per_s": (n - 1) / (times[-1] - times[0])}


def server_figure(a: argparse.Namespace, out: Path, prompt: list[int], k: int) -> dict[str, Any]:
    import bench_serve

    server = bench_serve.MtxServer(out, a.threads, 128, 1)
    spec = {"method": "ngram", "num_speculative_tokens": k}
    runs: dict[str, list] = {"plain": [], f"ngram_k{k}": []}
    try:
        for s in (None, spec):  # warm-up; the first also fills the server's prefix cache
            asyncio.run(_stream(server.url, prompt, 16, s))
        for r in range(a.rounds):
            order = [("plain", None), (f"ngram_k{k}", spec)]
            for name, s in order if r % 2 == 0 else order[::-1]:
                res = asyncio.run(_stream(server.url, prompt, a.new_tokens, s))
                res["loadavg"] = benchlib.loadavg()
                runs[name].append(res)
    finally:
        server.stop()
    want = runs["plain"][0]["text"]
    plain = float(np.median([x["decode_tokens_per_s"] for x in runs["plain"]]))
    rep = {}
    for name, rs in runs.items():
        tps = float(np.median([x["decode_tokens_per_s"] for x in rs]))
        rep[name] = {"decode_tokens_per_s": round(tps, 1), "ratio_vs_plain": round(tps / plain, 3),
                     "same_text_as_plain": all(x["text"] == want for x in rs),
                     "samples_decode_tokens_per_s": [round(x["decode_tokens_per_s"], 1) for x in rs],
                     "loadavg": [x["loadavg"] for x in rs]}
    rep["setup"] = (f"mtx serve {out.name} --threads {a.threads} --max-batch 1 (prefix cache on by default); "
                    f"request field speculative={json.dumps(spec)}")
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(ap, work="/tmp/mtx-bench-serve", prompt_len=None, new_tokens=256)
    ap.add_argument("--ks", default="2,4,8", help="draft lengths (num_tokens) to compare")
    ap.add_argument("--random-ks", default="4", help="draft lengths on the random prompts (4: the default)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per system, alternating (medians reported)")
    ap.add_argument("--prefix-len", type=int, default=3072, help="source words before the copied span "
                    "(raised to the receptive field L(W-1)+1)")
    ap.add_argument("--server", action="store_true", help="also one server-level figure (best k)")
    ap.add_argument("--no-profile", action="store_true")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    if a.child:
        child(a)
        return
    out = export_once(a.work)
    cmd = [sys.executable, __file__, "--child", "--work", a.work, "--threads", a.threads, "--new-tokens",
           a.new_tokens, "--ks", a.ks, "--random-ks", a.random_ks, "--rounds", a.rounds, "--prefix-len", a.prefix_len]
    rep = benchlib.run_json(cmd + (["--no-profile"] if a.no_profile else []), "bench_spec: in-process")
    prompt = rep.pop("prompt_for_server")
    report: dict[str, Any] = {
        "model": "bench_peers 125M Mistral (float32, onnxruntime target, window 256, KV capacity 256)",
        "threads": a.threads, "new_tokens": a.new_tokens, "batch": 1, "greedy": True,
        "note": "shared 2-core machine; other jobs ran at the same time: noisy. loadavg: 1/5/15-minute load "
                "average read right after each timed run",
        "in_process": rep,
    }
    if a.server:
        k = int(rep["copy_greedy"]["best"].removeprefix("ngram_k"))
        report["server"] = server_figure(a, out, prompt, k)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

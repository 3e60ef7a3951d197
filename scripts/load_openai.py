#!/usr/bin/env python
"""Load generator for `mtx serve` (or any OpenAI-compatible server): N concurrent streaming clients
using the official openai package, bounded by a request count and a duration. Prints JSON.

    python scripts/load_openai.py --url http://127.0.0.1:8000 --model NAME --clients 8 --requests 32 \\
        [--duration 120] [--prompt-len 128] [--max-tokens 128] [--distinct 4] [--check OUT]

Prompts are random token ids (seeded; ``--distinct`` different ones, reused in turn), sent to
/v1/completions with ``stream: true``, greedy, ``ignore_eos`` and usage in the last chunk. Every
response must be complete (finish_reason "length", ``max_tokens`` tokens by usage); with ``--check
OUT`` its text must also equal ``Generator.generate`` of the export OUT run alone in this process.

Reported: throughput (completion tokens/s over the run), the aggregate decode rate while all clients
were streaming, time to first token p50/p99 (request sent -> first text chunk), inter-token latency
p50/p99 (gaps between chunks), errors. The machine is shared: numbers are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


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


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(values, q)), 4) if values else None


def summarize(results: list[Result], t0: float, t1: float, max_tokens: int,
              expected: dict[int, str] | None) -> dict[str, Any]:
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


def offline_texts(export: str, prompts: list[list[int]], max_tokens: int, threads: int | None) -> dict[int, str]:
    import mtx.runtime

    gen = mtx.runtime.load(export, threads=threads)
    return {i: gen.decode(gen.generate([p], max_new_tokens=max_tokens, stop_token_ids=[])[0])
            for i, p in enumerate(prompts)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--model", required=True, help="model id the server serves (GET /v1/models)")
    ap.add_argument("--clients", type=int, default=8, help="concurrent streaming clients")
    ap.add_argument("--requests", type=int, default=32, help="requests in all (at most)")
    ap.add_argument("--duration", type=float, default=300, help="stop starting requests after this many seconds")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--distinct", type=int, default=4, help="distinct prompts, reused in turn")
    ap.add_argument("--vocab", type=int, default=None, help="token ids below this (default: from --check, else 128)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--check", default=None, metavar="OUT", help="export folder: compare each text with the offline one")
    ap.add_argument("--threads", type=int, default=None, help="threads of the offline check")
    a = ap.parse_args()
    if a.clients < 1 or a.requests < 1 or a.duration <= 0 or a.prompt_len < 1 or a.max_tokens < 1 or a.distinct < 1:
        ap.error("--clients, --requests, --duration, --prompt-len, --max-tokens and --distinct must be positive")
    vocab = a.vocab
    if vocab is None and a.check:
        from mtx.manifest import read_manifest

        vocab = read_manifest(Path(a.check)).model_config.vocab_size
    prompts = make_prompts(a.distinct, a.prompt_len, vocab or 128, a.seed)
    expected = offline_texts(a.check, prompts, a.max_tokens, a.threads) if a.check else None
    results, t0, t1 = asyncio.run(run_load(a.url, a.model, prompts, a.clients, a.requests, a.duration, a.max_tokens))
    summary = summarize(results, t0, t1, a.max_tokens, expected)
    print(json.dumps({"clients": a.clients, "prompt_len": a.prompt_len, "max_tokens": a.max_tokens, **summary},
                     indent=2))
    sys.exit(1 if summary["errors"] or summary["incomplete"] or summary["mismatched"] else 0)


if __name__ == "__main__":
    main()

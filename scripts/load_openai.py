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
from pathlib import Path

from benchlib import make_prompts, offline_texts, run_load, summarize_load


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
    summary = summarize_load(results, t0, t1, a.max_tokens, expected)
    print(json.dumps({"clients": a.clients, "prompt_len": a.prompt_len, "max_tokens": a.max_tokens, **summary},
                     indent=2))
    sys.exit(1 if summary["errors"] or summary["incomplete"] or summary["mismatched"] else 0)


if __name__ == "__main__":
    main()

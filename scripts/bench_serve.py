#!/usr/bin/env python
"""`mtx serve` throughput and time to first token against `mtx bench`, on the 125M Mistral of
scripts/bench_peers.py. Prints JSON.

    python scripts/bench_serve.py [--work /tmp/mtx-bench-serve] [--threads 2] [--streams 1,4,8,16]
                                  [--budgets 256] [--prompt-len 128] [--new-tokens 128]

Setup: the checkpoint of bench_peers.py (made once in --work), exported once with --max-batch 16;
greedy, random 128-token prompts, 128 new tokens, 2 threads. For each token budget a fresh
`mtx serve` process; at each concurrency c, c streaming openai clients send their requests together
(scripts/load_openai.py). Every response is checked complete, and the c = 1 and 4 responses against
Generator.generate run alone. Reported per c: aggregate decode tokens/s while all c stream, its ratio
to c = 1, TTFT p50/p99, inter-token latency. `mtx bench --batch 1` (and `--batch 8`, the static
batch) run in their own processes, alternating with the server's single stream. The machine is
shared with other work: numbers are noisy.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import load_openai  # noqa: E402

MODEL = "mistral-125m"


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def export_once(work: Path) -> Path:
    from bench_peers import make_checkpoint

    out = work / "mtx-ort-b16"
    if not (out / "mtx.json").exists():
        ckpt = make_checkpoint(work)
        subprocess.run([sys.executable, "-m", "mtx", "export", str(ckpt), "-o", str(out), "--target", "onnxruntime",
                        "--max-batch", "16", "--force"], check=True, stdout=subprocess.DEVNULL, env=_env())
    return out


def mtx_bench(out: Path, threads: int, batch: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-m", "mtx", "bench", str(out), "--threads", str(threads), "--batch", str(batch),
                        "--prompt-len", str(prompt_len), "--new-tokens", str(new_tokens), "--json"],
                       check=True, capture_output=True, text=True, env=_env())
    res = json.loads(r.stdout)
    return {"decode_tokens_per_s": res["decode_tokens_per_s"], "time_to_first_token_s": res["time_to_first_token_s"]}


class Server:
    def __init__(self, out: Path, threads: int, budget: int, max_batch: int) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "mtx", "serve", str(out), "--port", str(self.port),
                                      "--threads", str(threads), "--max-batch", str(max_batch), "--token-budget",
                                      str(budget), "--model-name", MODEL], env=_env(),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        import httpx

        for _ in range(600):
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("mtx serve did not become ready")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)


def load(server: Server, prompts: list[list[int]], clients: int, new_tokens: int,
         expected: dict[int, str] | None) -> dict[str, Any]:
    results, t0, t1 = asyncio.run(load_openai.run_load(server.url, MODEL, prompts[:clients], clients, clients, 600,
                                                       new_tokens))
    exp = None if expected is None else {i: expected[i] for i in range(min(clients, len(expected)))}
    if exp is not None and len(exp) < clients:
        exp = None
    return load_openai.summarize(results, t0, t1, new_tokens, exp)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, default=Path("/tmp/mtx-bench-serve"))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--budgets", default="256", help="comma-separated --token-budget values, one server each")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--check", type=int, default=4, help="check this many prompts against Generator alone")
    a = ap.parse_args()
    streams = [int(s) for s in a.streams.split(",")]
    budgets = [int(b) for b in a.budgets.split(",")]
    a.work.mkdir(parents=True, exist_ok=True)
    out = export_once(a.work)
    from mtx.manifest import read_manifest

    vocab = read_manifest(out).model_config.vocab_size
    prompts = load_openai.make_prompts(max(streams), a.prompt_len, vocab, seed=0)
    expected = load_openai.offline_texts(str(out), prompts[:a.check], a.new_tokens, a.threads) if a.check else None

    report: dict[str, Any] = {"model": "bench_peers 125M Mistral (float32, onnxruntime target)", "threads": a.threads,
                              "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                              "note": "shared 2-core machine; other jobs ran at the same time: noisy"}
    bench1 = [mtx_bench(out, a.threads, 1, a.prompt_len, a.new_tokens)]
    report["mtx_bench_static_batch8"] = mtx_bench(out, a.threads, 8, a.prompt_len, a.new_tokens)
    runs: dict[str, Any] = {}
    single_server = []
    for budget in budgets:
        server = Server(out, a.threads, budget, max(streams))
        try:
            load(server, prompts, 1, 8, None)  # warm-up: first calls plan kernels
            rows = {}
            for c in streams:
                rows[str(c)] = load(server, prompts, c, a.new_tokens, expected)
            bench1.append(mtx_bench(out, a.threads, 1, a.prompt_len, a.new_tokens))  # alternate with the server
            again = load(server, prompts, 1, a.new_tokens, expected)
            single_server += [rows["1"]["aggregate_decode_tokens_per_s"] or rows["1"]["throughput_tokens_per_s"],
                              again["aggregate_decode_tokens_per_s"] or again["throughput_tokens_per_s"]]
        finally:
            server.stop()
        base = rows[str(streams[0])]["aggregate_decode_tokens_per_s"]
        runs[str(budget)] = {c: {"aggregate_decode_tokens_per_s": r["aggregate_decode_tokens_per_s"],
                                 "ratio_vs_1_stream": round(r["aggregate_decode_tokens_per_s"] / base, 2)
                                 if base and r["aggregate_decode_tokens_per_s"] else None,
                                 "ttft_s": r["ttft_s"], "inter_token_latency_s": r["inter_token_latency_s"],
                                 "errors": r["errors"], "incomplete": r["incomplete"], "mismatched": r["mismatched"],
                                 "checked_against_offline": r["checked_against_offline"]}
                             for c, r in rows.items()}
    report["serve_by_token_budget"] = runs
    report["mtx_bench_batch1_runs"] = bench1
    best_bench = max(b["decode_tokens_per_s"] for b in bench1)
    report["single_stream"] = {"server_decode_tokens_per_s": single_server, "mtx_bench_decode_tokens_per_s": best_bench,
                               "ratio_server_vs_bench": round(max(single_server) / best_bench, 3)}
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

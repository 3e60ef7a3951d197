#!/usr/bin/env python
"""ONNX Runtime's intra-op spin-wait on and off, on an idle and on a loaded machine (prints JSON).

    python scripts/bench_spin.py [--work /tmp/mtx-bench] [--threads 2] [--repeats 3] [--new-tokens 128]
                                 [--quantize int4|int8|none] [--burners 1]

The model is the ~125M Mistral of scripts/bench_peers.py (batch 1, prompt 128, greedy), exported with
``--quantize`` (default int4, block 128). For each condition — ``idle`` (nothing started by this
script) and ``loaded`` (``--burners`` processes of ``python -c 'while True: pass'``, each taking a
core, started here and ended by their process id) — runs alternate between ``mtx.load(spin=True)``
and ``mtx.load(spin=False)``, each in a process of its own, after a warm-up run in that process.
Reported: decode tokens/s and time to first token (medians, with every sample), the ratio off / on,
whether both settings gave the same tokens, and the load average before and after each condition.

The machine is shared with other jobs: "idle" means only that this script adds no load, so the load
average is part of the result.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import benchlib

BURNER = "while True: pass"


def child(a: argparse.Namespace) -> None:
    prompt = benchlib.bench_prompt(a.prompt_len)
    run = benchlib.mtx_decode_runner(a.folder, a.threads, prompt, a.new_tokens, spin=a.spin == "on")
    print(json.dumps(benchlib.timed_twice(run)))


def condition(name: str, folder: Path, a: argparse.Namespace) -> dict:
    burners = [subprocess.Popen([sys.executable, "-c", BURNER]) for _ in range(a.burners if name == "loaded" else 0)]
    try:
        if burners:
            time.sleep(2)  # let the burners take their cores
        before = benchlib.loadavg()
        runs: dict[str, list] = {"on": [], "off": []}
        for _ in range(a.repeats):
            for spin in ("on", "off"):
                r = benchlib.run_json([sys.executable, __file__, "--child", "--spin", spin, "--folder", folder,
                                       "--threads", a.threads, "--new-tokens", a.new_tokens, "--prompt-len",
                                       a.prompt_len], f"bench_spin: {name}, spin {spin}")
                runs[spin].append((r["ttft"], r["steps"], r["tokens"]))
        after = benchlib.loadavg()
    finally:
        for b in burners:
            b.kill()
            b.wait()
    out = {"burners": len(burners), "loadavg_before": before, "loadavg_after": after}
    summary = {spin: benchlib.summarize(rs) for spin, rs in runs.items()}
    out["same_tokens"] = summary["on"].pop("tokens") == summary["off"].pop("tokens")
    out["spin_on"], out["spin_off"] = summary["on"], summary["off"]
    out["decode_ratio_off_over_on"] = round(summary["off"]["decode_tokens_per_s"]
                                            / summary["on"]["decode_tokens_per_s"], 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    benchlib.add_common_args(ap, work="/tmp/mtx-bench", prompt_len=128, new_tokens=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quantize", choices=["int4", "int8", "none"], default="int4")
    ap.add_argument("--burners", type=int, default=1, help="busy processes of the loaded condition")
    ap.add_argument("--conditions", default="idle,loaded", help="comma-separated: idle, loaded")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spin", choices=["on", "off"], help=argparse.SUPPRESS)
    ap.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        child(a)
        return
    a.work.mkdir(parents=True, exist_ok=True)
    ckpt = benchlib.make_checkpoint(a.work)
    args = [] if a.quantize == "none" else ["--quantize", a.quantize, "--block-size", "128"]
    name = {"none": "fp32", "int8": "int8", "int4": "int4-block-128"}[a.quantize]  # bench_quant.py's folders
    folder = benchlib.export_once(ckpt, a.work / f"mtx-125m-{name}", args)
    report = {"setup": {**benchlib.SHAPE, "quantize": a.quantize, "batch": 1, "prompt_len": a.prompt_len,
                        "new_tokens": a.new_tokens, "threads": a.threads, "repeats": a.repeats,
                        "burner": f"python -c '{BURNER}'"}}
    for name in a.conditions.split(","):
        report[name] = condition(name, folder, a)
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

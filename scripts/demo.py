#!/usr/bin/env python
"""The main job end to end on the built-in models: inspect, export, parity, generate, bench.

    make demo            (or: .venv/bin/python scripts/demo.py [--out mtx-out])

Every step is the `mtx` command a user would type, run as a subprocess; the demo stops at the first
failing step with its exit code.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
import time
from pathlib import Path

PROMPT = "import os\nimport sys\n\n\ndef main(argv):\n    "


def step(title: str, *args: str) -> None:
    cmd = [sys.executable, "-m", "mtx", *args]
    shown = "mtx " + " ".join(shlex.quote(a) for a in args)
    print(f"\n\033[1m== {title}\033[0m\n$ {shown}", flush=True)
    t0 = time.perf_counter()
    res = subprocess.run(cmd)
    if res.returncode != 0:
        print(f"demo: step failed with exit code {res.returncode}: {shown}", file=sys.stderr)
        sys.exit(res.returncode)
    print(f"({time.perf_counter() - t0:.1f} s)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("mtx-out"), help="folder for the exports")
    a = ap.parse_args()
    mistral, mixtral = str(a.out / "mistral"), str(a.out / "mixtral")
    step("check the built-in Mistral checkpoint", "inspect", "builtin:mistral")
    step("export it for ONNX Runtime (GroupQueryAttention with a sliding-window cache)",
         "export", "builtin:mistral", "-o", mistral, "--force")
    step("parity against PyTorch: chunked prefill, then decoding past 3 window wraps",
         "parity", "builtin:mistral", mistral)
    step("generate (sampled, seeded) from the export", "generate", mistral, "--prompt", PROMPT,
         "--max-new-tokens", "96", "--temperature", "0.7", "--top-p", "0.9", "--repetition-penalty", "1.2",
         "--seed", "1")
    step("export the built-in Mixtral as portable ONNX (mtx custom ops with function bodies)",
         "export", "builtin:mixtral", "-o", mixtral, "--target", "onnx", "--force")
    step("parity of the Mixtral export, with per-layer hidden-state errors", "parity", "builtin:mixtral", mixtral,
         "--per-layer")
    step("generate from the Mixtral export", "generate", mixtral, "--prompt", PROMPT, "--max-new-tokens", "64",
         "--temperature", "0.7", "--top-p", "0.9", "--repetition-penalty", "1.2", "--seed", "1")
    step("throughput and memory: 20 windows of decoding keep KV bytes and latency flat",
         "bench", mistral, "--prompt-len", "16", "--new-tokens", "660")
    print("\ndemo: all steps passed")


if __name__ == "__main__":
    main()

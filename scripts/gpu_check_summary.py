#!/usr/bin/env python
"""The closing table of scripts/gpu_check.sh, from the files it wrote into DIR.

    python scripts/gpu_check_summary.py DIR
"""

from __future__ import annotations

import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

ATTN_GOAL, MOE_GOAL = 0.85, 0.70


def main() -> None:
    d = Path(sys.argv[1])
    rows: list[tuple[str, str, str]] = []
    for line in (d / "steps.tsv").read_text().splitlines() if (d / "steps.tsv").exists() else []:
        name, rc, secs = line.split("\t")
        rows.append((name, "ok" if rc == "0" else f"exit {rc}", f"{secs} s"))
    if (d / "pytest.xml").exists():
        suite = ET.parse(d / "pytest.xml").getroot()
        suite = suite.find("testsuite") if suite.tag == "testsuites" else suite
        a = suite.attrib
        rows.append(("pytest -m gpu", f"{a.get('failures', 0)} failed, {a.get('errors', 0)} errors",
                     f"{a.get('tests')} tests, {a.get('skipped', 0)} skipped"))
    if (d / "bench_kernels.json").exists():
        b = json.loads((d / "bench_kernels.json").read_text())
        for r in b["results"]:
            if r["op"] == "swa_gqa_decode":
                rows.append((f"attn decode {r['impl']} B{r['batch']} W{r['window']}", f"{r['efficiency']:.0%} of bw",
                             "goal met" if r["efficiency"] >= ATTN_GOAL else f"goal {ATTN_GOAL:.0%}"))
            elif r["op"] == "moe_gemm":
                rows.append((f"moe gemm {r['model']} N{r['tokens']}", f"{r['peak_fraction']:.0%} of peak",
                             "goal met" if r["tokens"] < 64 or r["peak_fraction"] >= MOE_GOAL else f"goal {MOE_GOAL:.0%}"))
    if (d / "generate.json").exists():
        g = json.loads((d / "generate.json").read_text())
        for r in g["results"]:
            rows.append((f"generate 7B bf16 B{r['batch']}", f"mtx {r['mtx_tok_s']} / hf {r['hf_sdpa_tok_s']} tok/s",
                         "greedy identical" if r["identical_greedy_tokens"] else f"differs: {r.get('first_difference')}"))
    w = [max(len(r[i]) for r in rows) if rows else 5 for i in range(3)]
    print("\n" + "  ".join(h.ljust(w[i]) for i, h in enumerate(("check", "result", "note"))))
    for r in rows:
        print("  ".join(c.ljust(w[i]) for i, c in enumerate(r)))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Make a tiny random Mistral / Mixtral checkpoint (mtx.synthetic_checkpoints) from the shell.

    python scripts/make_checkpoint.py OUT [--arch mixtral] [--window 8|none] [--layout mistral] ...
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from mtx.synthetic_checkpoints import make_hf, to_mistral_layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--arch", choices=["mistral", "mixtral"], default="mistral")
    ap.add_argument("--layout", choices=["hf", "mistral"], default="hf")
    ap.add_argument("--window", default="8", help="sliding window, or 'none' for full attention")
    ap.add_argument("--vocab", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--head-dim", type=int, default=None)
    ap.add_argument("--intermediate", type=int, default=96)
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=2)
    ap.add_argument("--tie", action="store_true")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    window = None if a.window.lower() == "none" else int(a.window)
    kw = dict(vocab=a.vocab, hidden=a.hidden, layers=a.layers, heads=a.heads, kv_heads=a.kv_heads,
              head_dim=a.head_dim, intermediate=a.intermediate, window=window, experts=a.experts, top_k=a.top_k,
              tie=a.tie, dtype=a.dtype, seed=a.seed)
    if a.layout == "hf":
        make_hf(a.out, a.arch, **kw)
    else:
        tmp = a.out.with_name(a.out.name + ".hf-tmp")
        make_hf(tmp, a.arch, **kw)
        to_mistral_layout(tmp, a.out)
        shutil.rmtree(tmp)
    print(a.out)


if __name__ == "__main__":
    main()

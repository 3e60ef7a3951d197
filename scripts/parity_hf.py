#!/usr/bin/env python
"""Parity figures of the PyTorch reference against transformers eager, printed as JSON.

    python scripts/parity_hf.py [--seq 40] [--window 8]

For each tiny random checkpoint variant (the same ones the test suite uses), the logits at every
position of a sequence 5x the window, fed in chunks of 1, 3, 8 and the whole sequence through one
rolling buffer of capacity W, are compared with one full-sequence transformers forward. Also the
same weights in the mistral-inference layout, and the built-in models.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
from mtx import synthetic_checkpoints as make_checkpoint

VARIANTS = {
    "mistral (window 8)": dict(arch="mistral"),
    "mistral (sliding_window null)": dict(arch="mistral", window=None),
    "mixtral 4 experts top-2": dict(arch="mixtral", experts=4, top_k=2),
    "mixtral 8 experts top-2": dict(arch="mixtral", experts=8, top_k=2),
    "explicit head_dim 32": dict(arch="mistral", head_dim=32),
    "tied embeddings": dict(arch="mistral", tie=True),
}


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


def chunked(folder: Path, ids: torch.Tensor, chunk: int, capacity: int | None) -> torch.Tensor:
    from mtx.models import build_model

    model = build_model(folder, "float32")
    kv = model.new_kv(ids.shape[0], capacity)
    with torch.no_grad():
        return torch.cat([model(ids[:, s:s + chunk], torch.full((ids.shape[0],), s), kv)
                          for s in range(0, ids.shape[1], chunk)], 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seq", type=int, default=40)
    a = ap.parse_args()
    torch.set_num_threads(2)
    report: dict[str, dict] = {}
    ids = torch.randint(0, 128, (2, a.seq), generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as tmp:
        for name, kw in VARIANTS.items():
            kw = dict(kw)
            folder = make_checkpoint.make_hf(Path(tmp) / name.replace(" ", "_"), kw.pop("arch"), **kw)
            ref = hf_logits(folder, ids)
            cap = 64 if "window" in kw and kw["window"] is None else None
            row = {f"chunk {c}": float((chunked(folder, ids, c, cap) - ref).abs().max()) for c in (1, 3, 8, a.seq)}
            mi = make_checkpoint.to_mistral_layout(folder, Path(tmp) / (folder.name + "_mistral"))
            row["mistral-inference layout, chunk 8"] = float((chunked(mi, ids, 8, cap) - ref).abs().max())
            row["max |logit|"] = float(ref.abs().max())
            report[name] = row
    from mtx.assets import default_checkpoint
    from tokenizers import Tokenizer

    for name in ("mistral", "mixtral"):
        folder = default_checkpoint(name)
        text = (ROOT / "mtx" / "runtime" / "generator.py").read_text()
        tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
        bi = torch.tensor([tok.encode(text).ids[:200]])  # 200 tokens: > 6 windows of 32
        ref = hf_logits(folder, bi)
        report[f"built-in {name} (bf16 weights run in float32, 200 tokens)"] = {
            f"chunk {c}": float((chunked(folder, bi, c, None) - ref).abs().max()) for c in (1, 16, 200)}
    print(json.dumps({"tolerance": 1e-4, "seq": a.seq, "window": 8, "max_abs_diff_vs_transformers": report},
                     indent=2))


if __name__ == "__main__":
    main()

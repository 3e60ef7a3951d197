#!/usr/bin/env python
"""Eager generation with the mtx kernels against Hugging Face transformers (sdpa) on a CUDA GPU; prints JSON.

    python scripts/gpu_generate_check.py [--layers 32] [--new-tokens 64] [--batch 1 8] [--out result.json]

A Mistral-7B-shaped model (hidden 4096, 32 heads, 8 KV heads, head 128, MLP 14336, vocab 32000,
window 4096) with random weights in bfloat16 is written once as a Hugging Face checkpoint (to
/dev/shm when it exists), loaded by transformers (attn_implementation="sdpa") and by
``mtx.models.build_model`` (whose CUDA forward runs the Triton kernels of mtx/kernels). For each
batch size both decode greedily from the same random prompts: tokens/s of each, and whether the
greedy tokens are identical (else the first differing step and the reference's top-2 logit margin
there, since bfloat16 near-ties can flip between two correct implementations). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def make_checkpoint(folder: Path, layers: int) -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=layers, num_attention_heads=32,
                        num_key_value_heads=8, head_dim=128, vocab_size=32000, sliding_window=4096,
                        max_position_embeddings=32768, rope_theta=1e6, torch_dtype="bfloat16")
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = MistralForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    torch.cuda.empty_cache()
    return folder


def hf_generate(folder: Path, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").cuda().eval()
    with torch.no_grad():
        model.generate(ids[:, :8], max_new_tokens=4, do_sample=False)  # warm-up
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, output_logits=True,
                             return_dict_in_generate=True)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    logits = torch.stack(out.logits, 1).float()
    del model
    torch.cuda.empty_cache()
    return out.sequences[:, ids.shape[1]:], dt, logits


def mtx_generate(folder: Path, ids: torch.Tensor, new: int) -> tuple[torch.Tensor, float]:
    from mtx import kernels
    from mtx.models import build_model

    model = build_model(folder, "bfloat16").cuda().eval()
    assert kernels.enabled("cuda"), "the mtx kernels are not enabled on this GPU"
    b = ids.shape[0]

    def run(prompt: torch.Tensor, steps: int) -> torch.Tensor:
        kv = model.new_kv(b)
        pos = torch.zeros(b, dtype=torch.int64, device="cuda")
        logits = model(prompt, pos, kv)
        pos = pos + prompt.shape[1]
        toks = []
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            logits = model(nxt, pos, kv)
            pos = pos + 1
        return torch.cat(toks, 1)

    with torch.no_grad():
        run(ids[:, :8], 4)  # warm-up (Triton compiles here)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        toks = run(ids, new)
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return toks, dt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("gpu_generate_check.py needs a CUDA GPU")
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = Path(tempfile.mkdtemp(prefix="mtx-7b-", dir=base))
    rows = []
    try:
        t0 = time.perf_counter()
        folder = make_checkpoint(tmp / "ckpt", args.layers)
        made_s = time.perf_counter() - t0
        g = torch.Generator(device="cuda").manual_seed(1)
        for b in args.batch:
            ids = torch.randint(0, 32000, (b, args.prompt_len), device="cuda", generator=g)
            ref, hf_s, ref_logits = hf_generate(folder, ids, args.new_tokens)
            got, mtx_s = mtx_generate(folder, ids, args.new_tokens)
            same = bool(torch.equal(ref, got))
            row = dict(batch=b, new_tokens=args.new_tokens, prompt_len=args.prompt_len,
                       hf_sdpa_tok_s=round(b * args.new_tokens / hf_s, 1), mtx_tok_s=round(b * args.new_tokens / mtx_s, 1),
                       identical_greedy_tokens=same)
            if not same:
                diff = (ref != got).nonzero()
                r, step = int(diff[0, 0]), int(diff[0, 1])
                top2 = ref_logits[r, step].topk(2).values
                row.update(first_difference=dict(row=r, step=step, reference_top2_margin=round(float(top2[0] - top2[1]), 4)))
            rows.append(row)
        result = dict(device=torch.cuda.get_device_name(), layers=args.layers, checkpoint_s=round(made_s, 1),
                      results=rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Eager generation with the mtx kernels against Hugging Face transformers (sdpa) on a CUDA GPU; prints JSON.

    python scripts/gpu_generate_check.py [--layers 32] [--new-tokens 64] [--batch 1 8] [--out result.json]
    python scripts/gpu_generate_check.py --shape tiny --device cpu    (a smoke run of the same code path)

A Mistral-7B-shaped model (hidden 4096, 32 heads, 8 KV heads, head 128, MLP 14336, vocab 32000,
window 4096) with random weights in bfloat16 is written once as a Hugging Face checkpoint (to
/dev/shm when it exists), loaded by transformers (attn_implementation="sdpa") and by
``mtx.models.build_model`` (whose CUDA forward runs the Triton kernels of mtx/kernels). For each
batch size both decode greedily from the same random prompts: tokens/s of each, and whether the
greedy tokens are identical (else the first differing step and the reference's top-2 logit margin
there, since bfloat16 near-ties can flip between two correct implementations). Needs a CUDA GPU;
``--shape tiny --device cpu`` runs the same comparison on a 2-layer model (mtx then uses its
PyTorch reference ops, not the kernels: the JSON says which).
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


DEVICE = "cuda"
SHAPES = {  # name -> MistralConfig arguments
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               vocab_size=32000, sliding_window=4096, max_position_embeddings=32768),
    "tiny": dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                 vocab_size=512, sliding_window=16, max_position_embeddings=256),
}


def make_checkpoint(folder: Path, layers: int, shape: str = "7b") -> Path:
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(num_hidden_layers=layers, rope_theta=1e6, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(DEVICE):
        model = MistralForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(folder, safe_serialization=True)
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return folder


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def hf_generate(folder: Path, prompts: list[torch.Tensor], new: int) -> list[tuple[torch.Tensor, float, torch.Tensor]]:
    """Greedy tokens [B, new], seconds, and per-step logits [B, new, V] of transformers (sdpa), per prompt batch."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="sdpa").to(DEVICE).eval()
    model.generation_config.eos_token_id = None  # random weights: never stop early, exactly `new` tokens
    model.generation_config.pad_token_id = 0
    out = []
    with torch.no_grad():
        model.generate(prompts[0][:, :8], max_new_tokens=4, do_sample=False)  # warm-up
        for ids in prompts:
            _sync()
            t0 = time.perf_counter()
            res = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
            _sync()
            out.append((res.sequences[:, ids.shape[1]:], time.perf_counter() - t0, torch.stack(res.logits, 1).float()))
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def mtx_generate(folder: Path, prompts: list[torch.Tensor], new: int) -> list[tuple[torch.Tensor, float]]:
    """Greedy tokens [B, new] and seconds of the mtx eager model (Triton kernels on CUDA), per prompt batch."""
    from mtx import kernels
    from mtx.models import build_model

    model = build_model(folder, "bfloat16").to(DEVICE).eval()
    if DEVICE == "cuda" and not kernels.enabled("cuda"):
        raise SystemExit("the mtx kernels are not enabled on this GPU (compute capability >= 8.0 and triton needed)")

    def run(model, prompt: torch.Tensor, steps: int) -> torch.Tensor:
        b = prompt.shape[0]
        kv = model.new_kv(b)
        pos = torch.zeros(b, dtype=torch.int64, device=DEVICE)
        logits = model(prompt, pos, kv)
        pos = pos + prompt.shape[1]
        toks = []
        for _ in range(steps):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            toks.append(nxt)
            if len(toks) == steps:
                break
            logits = model(nxt, pos, kv)
            pos = pos + 1
        return torch.cat(toks, 1)

    out = []
    with torch.no_grad():
        for ids in prompts:
            run(model, ids[:, :8], 4)  # warm-up (Triton compiles for this batch size here)
            _sync()
            t0 = time.perf_counter()
            toks = run(model, ids, new)
            _sync()
            out.append((toks, time.perf_counter() - t0))
    del model
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--shape", choices=list(SHAPES), default="7b")
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    args = ap.parse_args()
    global DEVICE
    DEVICE = args.device
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_generate_check.py needs a CUDA GPU (or --shape tiny --device cpu for a smoke run)")
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    tmp = Path(tempfile.mkdtemp(prefix="mtx-7b-", dir=base))
    rows = []
    try:
        t0 = time.perf_counter()
        folder = make_checkpoint(tmp / "ckpt", args.layers, args.shape)
        made_s = time.perf_counter() - t0
        g = torch.Generator(device=DEVICE).manual_seed(1)
        vocab = SHAPES[args.shape]["vocab_size"]
        prompts = [torch.randint(0, vocab, (b, args.prompt_len), device=DEVICE, generator=g) for b in args.batch]
        refs = hf_generate(folder, prompts, args.new_tokens)
        gots = mtx_generate(folder, prompts, args.new_tokens)
        for b, (ref, hf_s, ref_logits), (got, mtx_s) in zip(args.batch, refs, gots):
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
        from mtx import kernels

        result = dict(device=torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", shape=args.shape,
                      layers=args.layers, mtx_kernels=bool(DEVICE == "cuda" and kernels.enabled("cuda")),
                      checkpoint_s=round(made_s, 1), results=rows)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""Remake the built-in default models in mtx/assets/ (a small Mistral and a Mixtral variant).

    python scripts/make_default_model.py [--steps 300] [--out mtx/assets]

How they are made, so the demo prints recognisable text rather than noise:
1. Corpus: Python's own standard-library sources (every machine has them offline), files sorted by
   path, concatenated; 2% of files held out for a validation loss.
2. Tokenizer: byte-level BPE (tokenizers), 2048 tokens, specials <unk>=0, <s>=1, </s>=2.
3. Models, trained with transformers (the oracle of the test suite) on CPU for a few minutes each,
   AdamW with warm-up and cosine decay, sequences of 128 tokens with a sliding window of 32, so
   training and the demo both run past the window:
     mistral: hidden 256, 4 layers, 4 heads of 64, 2 KV heads, SwiGLU 768           (~4.1 M params)
     mixtral: same attention, 4 experts of SwiGLU 256, top-2                        (~4.9 M params)
4. Saved with save_pretrained in bfloat16 (HF layout, per-expert w1/w2/w3) with the tokenizer:
   about 18 MB for both.

Results depend on the Python version's stdlib (3.11 here) and on torch's CPU kernels; the seed is fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sysconfig
import time
from pathlib import Path

import torch

SPECIALS = ["<unk>", "<s>", "</s>"]
VOCAB = 2048
SEQ = 128
WINDOW = 32


def corpus_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if "site-packages" not in p.parts and "test" not in p.parts and "tests" not in p.parts
                   and "idlelib" not in p.parts and p.stat().st_size < 200_000)
    return files


def read_text(paths: list[Path]) -> str:
    parts = []
    for p in paths:
        try:
            parts.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return "\n\n".join(parts)


def train_tokenizer(text_files: list[Path], out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(p) for p in text_files], trainer)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "add_bos_token": True, "add_eos_token": False,
        "model_max_length": 4096}, indent=2))
    return tok


def make_model(arch: str):
    from transformers import MistralConfig, MistralForCausalLM, MixtralConfig, MixtralForCausalLM

    common = dict(vocab_size=VOCAB, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=64, sliding_window=WINDOW, max_position_embeddings=4096,
                  rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-5,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=False, initializer_range=0.02)
    common["attn_implementation"] = "sdpa"
    if arch == "mistral":
        return MistralForCausalLM(MistralConfig(intermediate_size=768, **common))
    return MixtralForCausalLM(MixtralConfig(intermediate_size=256, num_local_experts=4, num_experts_per_tok=2,
                                            router_aux_loss_coef=0.01, output_router_logits=True, **common))


def batches(ids: torch.Tensor, batch: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, ids.numel() - SEQ - 1, (batch,), generator=gen)
        yield torch.stack([ids[s:s + SEQ] for s in starts])


@torch.no_grad()
def val_loss(model, ids: torch.Tensor) -> float:
    model.eval()
    n = (ids.numel() - 1) // SEQ
    chunks = ids[: n * SEQ].view(n, SEQ)[:32]
    loss = model(input_ids=chunks, labels=chunks).loss.item()
    model.train()
    return loss


def train(arch: str, train_ids: torch.Tensor, val_ids: torch.Tensor, steps: int, batch: int, lr: float,
          out: Path, tokenizer_dir: Path) -> dict:
    torch.manual_seed(0)
    model = make_model(arch)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.05)
    warm = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    gen = torch.Generator().manual_seed(1)
    it = batches(train_ids, batch, gen)
    t0 = time.time()
    first = val_loss(model, val_ids)
    for step in range(steps):
        x = next(it)
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 25 == 0 or step == steps - 1:
            print(f"{arch} step {step:4d} loss {loss.item():.3f} ({time.time() - t0:.0f}s)", flush=True)
    last = val_loss(model, val_ids)
    model.config.output_router_logits = False
    model = model.to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (out / f).write_bytes((tokenizer_dir / f).read_bytes())
    return {"arch": arch, "steps": steps, "train_seconds": round(time.time() - t0, 1),
            "val_loss_before": round(first, 3), "val_loss_after": round(last, 3),
            "parameters": sum(p.numel() for p in model.parameters())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parents[1] / "mtx" / "assets")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--only", choices=["mistral", "mixtral"], default=None)
    a = ap.parse_args()
    torch.set_num_threads(2)
    files = corpus_files()
    rng = random.Random(0)
    val_files = sorted(rng.sample(files, max(1, len(files) // 50)))
    train_files = [f for f in files if f not in set(val_files)]
    tok_dir = a.out / "tokenizer-build"
    tok = train_tokenizer(train_files, tok_dir)
    train_ids = torch.tensor(tok.encode(read_text(train_files)).ids, dtype=torch.long)
    val_ids = torch.tensor(tok.encode(read_text(val_files)).ids, dtype=torch.long)
    print(f"corpus: {len(train_files)} files, {train_ids.numel():,} train tokens, {val_ids.numel():,} val tokens")
    report = []
    for arch in (["mistral", "mixtral"] if a.only is None else [a.only]):
        report.append(train(arch, train_ids, val_ids, a.steps, a.batch, a.lr, a.out / f"default-{arch}", tok_dir))
    for f in tok_dir.iterdir():
        f.unlink()
    tok_dir.rmdir()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

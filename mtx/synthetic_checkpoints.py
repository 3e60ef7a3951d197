"""Tiny random Mistral / Mixtral checkpoints for tests and benchmarks, with transformers as the author.

Needs transformers (the ``test`` extra). From the shell: ``python scripts/make_checkpoint.py OUT ...``.

``make_hf`` saves a transformers model (``save_pretrained``): HF names, per-expert w1/w2/w3,
optional shards with ``model.safetensors.index.json``. ``to_mistral_layout`` rewrites such a folder
as mistral-inference would ship it: ``params.json`` + ``consolidated.safetensors`` with interleaved
RoPE rows in wq/wk. Weights are drawn with a large ``init_std`` so attention is sharp and an
off-by-one window changes the logits visibly.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file


def make_hf(
    out: str | Path,
    arch: str = "mistral",
    *,
    vocab: int = 128,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    head_dim: int | None = None,
    intermediate: int = 96,
    window: int | None = 8,
    experts: int = 4,
    top_k: int = 2,
    tie: bool = False,
    theta: float = 10000.0,
    rope_theta_top_level: bool = False,
    max_positions: int = 4096,
    dtype: str = "float32",
    seed: int = 0,
    init_std: float = 0.15,
    max_shard_size: str | None = None,
    tokenizer: bool = True,
    layer_types: list[str] | None = None,
) -> Path:
    """Save a random transformers model to ``out`` and return the folder.

    ``arch="ministral"``: transformers' Ministral, whose ``layer_types`` ("sliding_attention" /
    "full_attention" per layer) give each layer its window."""
    from transformers import (MinistralConfig, MinistralForCausalLM, MistralConfig, MistralForCausalLM,
                              MixtralConfig, MixtralForCausalLM)

    out = Path(out)
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, head_dim=head_dim,
                  sliding_window=window, max_position_embeddings=max_positions, tie_word_embeddings=tie,
                  rope_parameters={"rope_type": "default", "rope_theta": theta}, initializer_range=init_std,
                  rms_norm_eps=1e-5)
    torch.manual_seed(seed)
    if arch == "mistral":
        model = MistralForCausalLM(MistralConfig(**common))
    elif arch == "ministral":
        # MinistralConfig leaves head_dim None where Mistral's defaults it (its attention then fails)
        common["head_dim"] = head_dim or hidden // heads
        model = MinistralForCausalLM(MinistralConfig(**common, layer_types=layer_types))
    elif arch == "mixtral":
        model = MixtralForCausalLM(MixtralConfig(**common, num_local_experts=experts, num_experts_per_tok=top_k))
    else:
        raise ValueError(f"unknown arch {arch!r}")
    with torch.no_grad():  # RMSNorm weights start at 1: give them some spread too
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.uniform_(0.5, 1.5)
    model = model.to(getattr(torch, dtype))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kw)
    if tokenizer:
        write_word_tokenizer(out, vocab)
    if rope_theta_top_level:  # transformers 4 spelling
        cfg = json.loads((out / "config.json").read_text())
        cfg.pop("rope_parameters", None)
        cfg["rope_theta"] = theta
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    return out


def write_word_tokenizer(folder: str | Path, vocab: int) -> None:
    """A word-level tokenizer.json with ``vocab`` entries (<unk>, <s>, </s>, then w3, w4, ...)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    folder = Path(folder)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))


def interleave_rope_rows(w: torch.Tensor, heads: int) -> torch.Tensor:
    """HF half-split q/k rows -> mistral-inference interleaved pairs (inverse of the loader's permute)."""
    rows, cols = w.shape
    return w.reshape(heads, 2, rows // heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_mistral_layout(hf_dir: str | Path, out: str | Path) -> Path:
    """Rewrite an HF checkpoint folder in the mistral-inference layout."""
    hf_dir, out = Path(hf_dir), Path(out)
    cfg = json.loads((hf_dir / "config.json").read_text())
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(hf_dir.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for k in st.keys():
                tensors[k] = st.get_tensor(k)
    heads, kv_heads = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    out_t: dict[str, torch.Tensor] = {
        "tok_embeddings.weight": tensors["model.embed_tokens.weight"],
        "norm.weight": tensors["model.norm.weight"],
    }
    if not cfg.get("tie_word_embeddings"):
        out_t["output.weight"] = tensors["lm_head.weight"]
    moe = cfg["model_type"] == "mixtral"
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        q = f"layers.{i}."
        out_t[q + "attention_norm.weight"] = tensors[p + "input_layernorm.weight"]
        out_t[q + "ffn_norm.weight"] = tensors[p + "post_attention_layernorm.weight"]
        out_t[q + "attention.wq.weight"] = interleave_rope_rows(tensors[p + "self_attn.q_proj.weight"], heads)
        out_t[q + "attention.wk.weight"] = interleave_rope_rows(tensors[p + "self_attn.k_proj.weight"], kv_heads)
        out_t[q + "attention.wv.weight"] = tensors[p + "self_attn.v_proj.weight"]
        out_t[q + "attention.wo.weight"] = tensors[p + "self_attn.o_proj.weight"]
        if moe:
            out_t[q + "feed_forward.gate.weight"] = tensors[p + "block_sparse_moe.gate.weight"]
            for e in range(cfg["num_local_experts"]):
                for w in ("w1", "w2", "w3"):
                    out_t[q + f"feed_forward.experts.{e}.{w}.weight"] = \
                        tensors[p + f"block_sparse_moe.experts.{e}.{w}.weight"]
        else:
            for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                out_t[q + f"feed_forward.{ours}.weight"] = tensors[p + f"mlp.{theirs}.weight"]
    rope = cfg.get("rope_parameters") or {}
    params = {
        "dim": cfg["hidden_size"], "n_layers": cfg["num_hidden_layers"],
        "head_dim": cfg.get("head_dim") or cfg["hidden_size"] // heads,
        "hidden_dim": cfg["intermediate_size"], "n_heads": heads, "n_kv_heads": kv_heads,
        "norm_eps": cfg["rms_norm_eps"], "vocab_size": cfg["vocab_size"],
        "rope_theta": cfg.get("rope_theta", rope.get("rope_theta", 10000.0)),
    }
    if cfg.get("layer_types") and len(set(cfg["layer_types"])) > 1:  # mistral-inference's per-layer list
        params["sliding_window"] = [cfg["sliding_window"] if t == "sliding_attention" else None
                                    for t in cfg["layer_types"]]
    elif cfg.get("sliding_window") is not None:
        params["sliding_window"] = cfg["sliding_window"]
    if cfg.get("tie_word_embeddings"):
        params["tied_embeddings"] = True
    if moe:
        params["moe"] = {"num_experts": cfg["num_local_experts"], "num_experts_per_tok": cfg["num_experts_per_tok"]}
    out.mkdir(parents=True, exist_ok=True)
    (out / "params.json").write_text(json.dumps(params, indent=2))
    save_file({k: v.contiguous() for k, v in out_t.items()}, str(out / "consolidated.safetensors"))
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        if (hf_dir / extra).exists():
            shutil.copy(hf_dir / extra, out / extra)
    return out

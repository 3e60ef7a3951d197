"""Shared fixtures: tiny random checkpoints written by transformers into temp dirs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import make_checkpoint  # noqa: E402  (scripts/ is not a package)

torch.set_num_threads(2)

#: name -> make_hf keyword arguments. Window 8 with prompts of 3-5x the window.
VARIANTS: dict[str, dict] = {
    "mistral": dict(arch="mistral", window=8),
    "mistral_full": dict(arch="mistral", window=None),
    "mixtral4": dict(arch="mixtral", window=8, experts=4, top_k=2),
    "mixtral8": dict(arch="mixtral", window=8, experts=8, top_k=2),
    "head_dim": dict(arch="mistral", window=8, head_dim=32),
    "tied": dict(arch="mistral", window=8, tie=True),
    "theta_top_level": dict(arch="mistral", window=8, rope_theta_top_level=True, theta=50000.0),
    "sharded": dict(arch="mixtral", window=8, max_shard_size="40KB"),
}


@pytest.fixture(scope="session")
def ckpt_factory(tmp_path_factory):
    """ckpt_factory(name) -> folder of the tiny HF checkpoint ``name`` (made once per session)."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            kw = dict(VARIANTS[name])
            arch = kw.pop("arch")
            cache[name] = make_checkpoint.make_hf(tmp_path_factory.mktemp(name), arch, **kw)
        return cache[name]

    return make


@pytest.fixture(scope="session")
def mistral_layout_factory(ckpt_factory, tmp_path_factory):
    """The same weights as ckpt_factory(name), rewritten in the mistral-inference layout."""
    cache: dict[str, Path] = {}

    def make(name: str) -> Path:
        if name not in cache:
            cache[name] = make_checkpoint.to_mistral_layout(ckpt_factory(name),
                                                            tmp_path_factory.mktemp(name + "_mistral"))
        return cache[name]

    return make


def hf_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    """Oracle: transformers eager, one full forward over the whole sequence (no cache), float32."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits

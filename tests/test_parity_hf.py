"""The PyTorch reference against transformers eager, on the same weights, far past the window."""

from __future__ import annotations

import pytest
import torch

from conftest import VARIANTS, hf_logits
from mtx.models import build_model

ATOL = 1e-4
SEQ = 40  # 5x the window of 8


def run_chunked(model, ids: torch.Tensor, chunk: int, capacity: int | None = None) -> torch.Tensor:
    """Feed ids [B, T] in chunks through one rolling buffer; return logits [B, T, V]."""
    b, t = ids.shape
    kv = model.new_kv(b, capacity)
    outs = []
    with torch.no_grad():
        for s in range(0, t, chunk):
            outs.append(model(ids[:, s:s + chunk], torch.full((b,), s, dtype=torch.long), kv))
    return torch.cat(outs, dim=1)


def capacity_for(name: str) -> int | None:
    return 64 if VARIANTS[name].get("window", 8) is None else None


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("chunk", [1, 3, 8, SEQ])
def test_logits_match_transformers(ckpt_factory, name, chunk):
    folder = ckpt_factory(name)
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(folder, ids)
    model = build_model(folder, "float32")
    got = run_chunked(model, ids, chunk, capacity_for(name))
    assert got.shape == ref.shape
    err = (got - ref).abs().max().item()
    assert err <= ATOL, f"{name} chunk={chunk}: max abs diff {err:.3e}"


@pytest.mark.parametrize("name", ["mistral", "mixtral4"])
def test_capacity_above_window(ckpt_factory, name):
    """C > W changes nothing but memory."""
    folder = ckpt_factory(name)
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(2))
    ref = hf_logits(folder, ids)
    got = run_chunked(build_model(folder, "float32"), ids, 5, capacity=13)
    assert (got - ref).abs().max().item() <= ATOL


def test_window_is_sharp(ckpt_factory):
    """The oracle can tell a window of W from W+1 and W-1: parity above is not vacuous."""
    folder = ckpt_factory("mistral")
    ids = torch.randint(0, 128, (1, SEQ), generator=torch.Generator().manual_seed(3))
    ref = hf_logits(folder, ids)
    for wrong in (7, 9):
        model = build_model(folder, "float32")
        for layer in model.layers:
            layer.attn.window = wrong
        got = run_chunked(model, ids, 4, capacity=16)
        assert (got - ref).abs().max().item() > 1e-2, f"window {wrong} indistinguishable from 8"


def test_ragged_rows(ckpt_factory):
    """Rows at different positions in one call give what each row gives alone."""
    folder = ckpt_factory("mixtral4")
    model = build_model(folder, "float32")
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(4))
    ref = hf_logits(folder, ids)
    kv = model.new_kv(2)
    with torch.no_grad():
        # row 0 runs ahead by 11 tokens alone (on a view of its buffer rows), then both step together
        model(ids[:1, :11], torch.tensor([0]), kv.rows(slice(0, 1)))
        model(ids[1:, :3], torch.tensor([0]), kv.rows(slice(1, 2)))
        out = model(torch.stack([ids[0, 11:14], ids[1, 3:6]]), torch.tensor([11, 3]), kv)
    assert (out[0] - ref[0, 11:14]).abs().max().item() <= ATOL
    assert (out[1] - ref[1, 3:6]).abs().max().item() <= ATOL


@pytest.mark.parametrize("name", ["mistral", "mixtral4", "tied", "head_dim", "mistral_full"])
def test_mistral_inference_layout(ckpt_factory, mistral_layout_factory, name):
    """The same weights in params.json + consolidated.safetensors give identical logits."""
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(5))
    a = run_chunked(build_model(ckpt_factory(name), "float32"), ids, 6, capacity_for(name))
    b = run_chunked(build_model(mistral_layout_factory(name), "float32"), ids, 6, capacity_for(name))
    assert torch.equal(a, b)


def test_mistral_rope_layout_matches_mistral_inference_semantics(mistral_layout_factory):
    """Independent check of the q/k row permutation: scores from mistral-inference's complex RoPE
    on the raw consolidated weights equal ours from the loaded (half-split) weights."""
    from safetensors.torch import load_file

    from mtx.models.ops import apply_rope

    folder = mistral_layout_factory("mistral")
    raw = load_file(str(folder / "consolidated.safetensors"))
    model = build_model(folder, "float32")
    heads, kv_heads, d = model.cfg.num_heads, model.cfg.num_kv_heads, model.cfg.head_dim
    x = torch.randn(1, 6, model.cfg.hidden_size, generator=torch.Generator().manual_seed(6))
    pos = torch.arange(6)[None] + 30

    def mi_rope(t: torch.Tensor) -> torch.Tensor:  # mistral-inference rope.py, interleaved pairs
        freqs = 1.0 / (model.cfg.rope_theta ** (torch.arange(0, d, 2)[: d // 2].float() / d))
        cis = torch.polar(torch.ones(6, d // 2), torch.outer(pos[0].float(), freqs))
        tc = torch.view_as_complex(t.float().reshape(*t.shape[:-1], -1, 2))
        return torch.view_as_real(tc * cis[None, :, None, :]).flatten(-2)

    q_mi = mi_rope((x @ raw["layers.0.attention.wq.weight"].T).reshape(1, 6, heads, d))
    k_mi = mi_rope((x @ raw["layers.0.attention.wk.weight"].T).reshape(1, 6, kv_heads, d))
    attn = model.layers[0].attn
    q = apply_rope(attn.wq(x).reshape(1, 6, heads, d), pos, model.inv_freq)
    k = apply_rope(attn.wk(x).reshape(1, 6, kv_heads, d), pos, model.inv_freq)
    g = heads // kv_heads
    s_mi = torch.einsum("bqhd,bkhd->bhqk", q_mi, k_mi.repeat_interleave(g, dim=2))
    s = torch.einsum("bqhd,bkhd->bhqk", q, k.repeat_interleave(g, dim=2))
    assert (s - s_mi).abs().max().item() < 1e-4


def test_dtype_conversion(ckpt_factory):
    """A float32 checkpoint runs in bfloat16 and stays close to the float32 logits."""
    folder = ckpt_factory("mistral")
    ids = torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(7))
    ref = run_chunked(build_model(folder, "float32"), ids, 4)
    model = build_model(folder, "bfloat16")
    assert model.embed.weight.dtype == torch.bfloat16
    got = run_chunked(model, ids, 4).float()
    rel = (got - ref).norm() / ref.norm()
    assert rel < 0.05

"""The Mistral / Mixtral transformer in one file: the PyTorch reference of the model family.

A forward call takes a chunk of tokens ``input_ids`` [B, S] at absolute positions
``start_pos[b] + i`` and a rolling KV buffer per layer ([B, Hkv, C, D] keys and values, C >= W).
Each attention block sees the buffer as it was before the call plus the chunk's own keys, then
writes the chunk into slots ``p mod C``. Long prompts go in chunks of any size.

Parameter names (``state_dict``) are mtx's canonical tensor names; see :mod:`mtx.models.checkpoint`
for how Hugging Face and mistral-inference names map onto them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mtx import rolling_kv
from mtx.config import ModelConfig
from mtx.models import ops


def _kernels_for(x: torch.Tensor) -> Any:
    """``mtx.kernels`` if the eager forward should run the Triton kernels on ``x``'s device, else None
    (decided once per forward call).

    Only CUDA tensors qualify (mtx.kernels.enabled: compute capability >= 8.0, triton present,
    ``MTX_KERNELS`` not ``0``); CPU runs are unchanged and never import triton.
    """
    if not x.is_cuda:
        return None
    from mtx import kernels

    return kernels if kernels.enabled(x.device) else None


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) computed in float32, cast back, times weight (as transformers)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.to(torch.float32)
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Attention(nn.Module):
    """Projections around one ``mtx::swa_gqa``; RoPE and the rolling buffer live inside the op.
    ``window`` is the op attribute of this layer (0: full attention; set by :meth:`Transformer.kv_plan`)."""

    def __init__(self, cfg: ModelConfig, window: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.window = window
        self.scale = cfg.head_dim ** -0.5
        self.wq = nn.Linear(cfg.hidden_size, cfg.num_heads * cfg.head_dim, bias=False)
        self.wk = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wv = nn.Linear(cfg.hidden_size, cfg.num_kv_heads * cfg.head_dim, bias=False)
        self.wo = nn.Linear(cfg.num_heads * cfg.head_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, start_pos: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                inv_freq: torch.Tensor, functional: bool, kernels: Any = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        args = (self.wq(x), self.wk(x), self.wv(x), past_key, past_value, start_pos, inv_freq,
                self.num_heads, self.num_kv_heads, self.window, self.scale)
        if functional:
            out, present_key, present_value = ops.swa_gqa(*args)
        else:
            if kernels is not None and kernels.supports_head_dim(self.head_dim):
                out = kernels.swa_gqa(*args)  # same contract as swa_gqa_inplace, on the GPU
            else:
                out = ops.swa_gqa_inplace(*args)
            present_key, present_value = past_key, past_value
        return self.wo(out), present_key, present_value


class FeedForward(nn.Module):
    """Dense SwiGLU: w2(silu(w1 x) * w3 x)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.w2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.w3 = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class MoE(nn.Module):
    """Sparse MoE block around one ``mtx::moe``; experts stacked as w1, w3 [E, I, H] and w2 [E, H, I]."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        e, i, h = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(h, e, bias=False)
        self.w1 = nn.Parameter(torch.empty(e, i, h))
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        self.w3 = nn.Parameter(torch.empty(e, i, h))

    def forward(self, x: torch.Tensor, functional: bool, kernels: Any = None) -> torch.Tensor:
        fn = ops.moe if functional else (kernels.moe if kernels is not None else ops.moe_reference)
        return fn(x, self.gate.weight, self.w1, self.w3, self.w2, self.top_k)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, window: int) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, window)
        self.ffn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.moe = MoE(cfg) if cfg.is_moe else None
        self.ffn = None if cfg.is_moe else FeedForward(cfg)

    def forward(self, x: torch.Tensor, start_pos: torch.Tensor, past_key: torch.Tensor, past_value: torch.Tensor,
                inv_freq: torch.Tensor, functional: bool, kernels: Any = None,
                after_attention: list[torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(block output, present_key, present_value); appends x + attention [B, S, H] to ``after_attention``.

        ``kernels``: ``mtx.kernels`` to run the eager (non-functional) ops on the GPU, else None.
        """
        a, present_key, present_value = self.attn(self.attn_norm(x), start_pos, past_key, past_value,
                                                  inv_freq, functional, kernels)
        h = x + a
        if after_attention is not None:
            after_attention.append(h)
        f = self.ffn_norm(h)
        f = self.moe(f, functional, kernels) if self.moe is not None else self.ffn(f)
        return h + f, present_key, present_value


@dataclass
class KVBuffers:
    """Rolling KV buffers of one sequence batch: per layer keys and values [B, Hkv, C_l, D]."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def capacities(self) -> tuple[int, ...]:
        return tuple(k.shape[2] for k in self.keys)

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def rows(self, index: slice) -> KVBuffers:
        """A view on some batch rows (no copy): writes through it land in these buffers."""
        return KVBuffers([k[index] for k in self.keys], [v[index] for v in self.values])


class Transformer(nn.Module):
    """Mistral (dense) or Mixtral (MoE) decoder. See the module docstring for the call contract."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, w) for w in cfg.windows)
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.output = None if cfg.tie_word_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        with torch.device("cpu"):
            inv_freq = ops.rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_linear_factor)
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def kv_plan(self, capacity: int | rolling_kv.KVPlan | None = None) -> rolling_kv.KVPlan:
        """The per-layer windows and capacities for a requested ``capacity`` (:func:`rolling_kv.plan_kv`) or
        an export's own plan; a layer whose window the plan makes full attention (a window of at least the
        context) gets op window 0 until a later plan gives it back."""
        if isinstance(capacity, rolling_kv.KVPlan):
            plan = capacity
            for l, (want, got, c) in enumerate(zip(self.cfg.windows, plan.windows, plan.capacities)):
                if got != want and not (got == 0 and want >= c):
                    raise ValueError(f"KV plan: layer {l} has window {got}, the model {want}")
        else:
            plan = rolling_kv.plan_kv(self.cfg.windows, self.cfg.max_position_embeddings, capacity)
        for layer, want, window in zip(self.layers, self.cfg.windows, plan.windows):
            # only the plan's own changes (a window of at least the context -> full attention) are set and
            # undone here: a window set on the module by its user (tests) stays as it is
            if window != want:
                layer.attn.window, layer.attn.planned = window, True
            elif getattr(layer.attn, "planned", False):
                layer.attn.window, layer.attn.planned = want, False
        return plan

    def new_kv(self, batch: int, capacity: int | rolling_kv.KVPlan | None = None, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None) -> KVBuffers:
        """Zeroed rolling buffers, layer l of C_l slots (:meth:`kv_plan`; default: the window, or max context)."""
        plan = self.kv_plan(capacity)
        dtype = dtype or self.embed.weight.dtype
        device = device or self.embed.weight.device
        shapes = [(batch, self.cfg.num_kv_heads, c, self.cfg.head_dim) for c in plan.capacities]
        return KVBuffers([torch.zeros(s, dtype=dtype, device=device) for s in shapes],
                         [torch.zeros(s, dtype=dtype, device=device) for s in shapes])

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        w = self.embed.weight if self.output is None else self.output.weight
        return F.linear(h, w)

    def forward(self, input_ids: torch.Tensor, start_pos: torch.Tensor, kv: KVBuffers,
                hidden_states: list[torch.Tensor] | None = None,
                attention_states: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Logits [B, S, V] for a chunk; updates ``kv`` in place.

        input_ids [B, S] int64; start_pos [B] int64 (absolute position of each row's first token).
        If ``hidden_states`` is a list, each layer's output [B, S, H] is appended to it; if
        ``attention_states`` is a list, each layer's residual stream after attention (x + attn) [B, S, H].
        """
        h = self.embed(input_ids)
        kernels = _kernels_for(h)
        for layer, k, v in zip(self.layers, kv.keys, kv.values):
            h, _, _ = layer(h, start_pos, k, v, self.inv_freq, functional=False, kernels=kernels,
                            after_attention=attention_states)
            if hidden_states is not None:
                hidden_states.append(h)
        return self.logits(self.norm(h))

    def forward_functional(self, input_ids: torch.Tensor, start_pos: torch.Tensor, past_keys: list[torch.Tensor],
                           past_values: list[torch.Tensor], hidden_states: list[torch.Tensor] | None = None,
                           attention_states: list[torch.Tensor] | None = None
                           ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """Traceable form: returns (logits, present_keys, present_values).

        One ``mtx::swa_gqa`` and (Mixtral) one ``mtx::moe`` node per layer; buffers are not mutated.
        ``hidden_states`` and ``attention_states`` are filled as in :meth:`forward`.
        """
        h = self.embed(input_ids)
        keys, values = [], []
        for layer, k, v in zip(self.layers, past_keys, past_values):
            h, k2, v2 = layer(h, start_pos, k, v, self.inv_freq, functional=True, after_attention=attention_states)
            keys.append(k2)
            values.append(v2)
            if hidden_states is not None:
                hidden_states.append(h)
        return self.logits(self.norm(h)), keys, values

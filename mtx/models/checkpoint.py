"""Lazy, memory-mapped checkpoint loading for Hugging Face and mistral-inference layouts.

A :class:`Checkpoint` indexes every ``*.safetensors`` file of a folder (through
``model.safetensors.index.json`` when present) by reading headers only. Each canonical mtx tensor
(the names of :class:`mtx.models.transformer.Transformer`'s ``state_dict``) has a :class:`Source`:
the checkpoint keys it comes from and how they combine (as is, stacked experts, mistral q/k
permutation, half of a fused gate/up). Tensors are read one at a time from the memory map, so a
checkpoint never sits in RAM twice; :func:`build_model` fills a model built on the meta device.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from mtx.config import ModelConfig, load_config, read_json_object
from mtx.errors import CheckpointError
from mtx.names import DTYPES, torch_dtype

INDEX_FILE = "model.safetensors.index.json"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise CheckpointError(f"dtype: unknown dtype {name!r}; expected one of {', '.join(DTYPES)}", params=("dtype",))
    return torch_dtype(name)


@dataclass(frozen=True)
class TensorRef:
    """One tensor stored in a safetensors file: ``data_offset`` is its first byte in the file."""

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    data_offset: int
    nbytes: int


@dataclass(frozen=True)
class Source:
    """How a canonical tensor is made from checkpoint tensors.

    kind: ``copy`` (one tensor as is), ``stack`` (experts along a new dim 0), ``rope_permute``
    (mistral-inference interleaved q/k rows to half-split, ``heads`` per tensor), ``first_half`` /
    ``second_half`` (dim 1 of a fused [E, 2I, H] gate_up tensor).
    """

    refs: tuple[TensorRef, ...]
    kind: str = "copy"
    heads: int = 0

    @property
    def is_plain(self) -> bool:
        """True when the canonical tensor is exactly one stored tensor's bytes."""
        return self.kind == "copy"


def read_header(path: Path) -> dict[str, TensorRef]:
    """Validate a safetensors file and index its tensors by key (header only, no data read)."""
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        raise CheckpointError(f"{path}: corrupt or truncated safetensors file ({e})") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror or e})") from None
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    base = 8 + n
    refs = {}
    for key, meta in header.items():
        if key == "__metadata__":
            continue
        begin, end = meta["data_offsets"]
        refs[key] = TensorRef(path, key, meta["dtype"], tuple(meta["shape"]), base + begin, end - begin)
    return refs


def _merge(refs: dict[str, TensorRef], more: dict[str, TensorRef]) -> None:
    """Add ``more`` to ``refs``; a tensor stored in two files is an error naming both."""
    for key, ref in more.items():
        if key in refs:
            raise CheckpointError(f"{ref.file}: tensor {key!r} is also stored in {refs[key].file}; "
                                  f"a checkpoint holds each tensor once (remove the stray file)")
        refs[key] = ref


def _read_weight_map(index_path: Path) -> dict[str, str]:
    data = read_json_object(index_path, CheckpointError)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index_path}: expected a JSON object with a 'weight_map' of tensor name -> file name")
    for key, name in weight_map.items():
        path = Path(name)
        if not name or path.is_absolute() or ".." in path.parts:
            raise CheckpointError(f"{index_path}: tensor {key!r} points at {name!r}, outside the checkpoint folder")
    return weight_map


def _index_files(root: Path, fmt: str) -> dict[str, TensorRef]:
    index_path = root / INDEX_FILE
    refs: dict[str, TensorRef] = {}
    if fmt == "hf" and index_path.is_file():
        weight_map = _read_weight_map(index_path)
        for name in sorted(set(weight_map.values())):
            if not (root / name).is_file():
                keys = [k for k, v in weight_map.items() if v == name]
                raise CheckpointError(f"{root / name}: shard listed in {INDEX_FILE} is missing "
                                      f"(holds tensor {keys[0]!r})")
            _merge(refs, read_header(root / name))
        for key, name in weight_map.items():
            if key not in refs or refs[key].file != root / name:
                raise CheckpointError(f"{root / name}: tensor {key!r} listed in {INDEX_FILE} is not in the file")
        return refs
    pattern = "consolidated*.safetensors" if fmt == "mistral" else "*.safetensors"
    files = sorted(root.glob(pattern))
    if not files:
        raise CheckpointError(f"{root}: no {pattern} files found")
    for path in files:
        _merge(refs, read_header(path))
    return refs


#: Checkpoint tensors that no canonical tensor uses but that are not model weights (older
#: transformers saved the rotary frequencies as buffers).
IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)


def check_finite(name: str, tensor: torch.Tensor, ref: TensorRef) -> None:
    """Raise CheckpointError naming the stored tensor if ``tensor`` holds NaN or Inf."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise CheckpointError(f"{ref.file}: tensor {ref.key!r} ({name}) holds NaN or Inf values; "
                              f"pass allow_nonfinite to export it anyway", params=("allow_nonfinite",))


def hf_names(cfg: ModelConfig, refs: dict[str, TensorRef]) -> dict[str, tuple[str | list[str], str]]:
    """canonical name -> (checkpoint key(s), kind) for the transformers layout."""
    m: dict[str, tuple[str | list[str], str]] = {"embed.weight": ("model.embed_tokens.weight", "copy"),
                                                  "norm.weight": ("model.norm.weight", "copy")}
    if not cfg.tie_word_embeddings:
        m["output.weight"] = ("lm_head.weight", "copy")
    for i in range(cfg.num_layers):
        p, q = f"model.layers.{i}.", f"layers.{i}."
        m[q + "attn_norm.weight"] = (p + "input_layernorm.weight", "copy")
        m[q + "ffn_norm.weight"] = (p + "post_attention_layernorm.weight", "copy")
        for ours, theirs in (("wq", "q_proj"), ("wk", "k_proj"), ("wv", "v_proj"), ("wo", "o_proj")):
            m[q + f"attn.{ours}.weight"] = (p + f"self_attn.{theirs}.weight", "copy")
        if not cfg.is_moe:
            for ours, theirs in (("w1", "gate_proj"), ("w2", "down_proj"), ("w3", "up_proj")):
                m[q + f"ffn.{ours}.weight"] = (p + f"mlp.{theirs}.weight", "copy")
        elif p + "mlp.experts.gate_up_proj" in refs:  # transformers 5 native (fused) expert layout
            m[q + "moe.gate.weight"] = (p + "mlp.gate.weight", "copy")
            m[q + "moe.w1"] = (p + "mlp.experts.gate_up_proj", "first_half")
            m[q + "moe.w3"] = (p + "mlp.experts.gate_up_proj", "second_half")
            m[q + "moe.w2"] = (p + "mlp.experts.down_proj", "copy")
        else:
            m[q + "moe.gate.weight"] = (p + "block_sparse_moe.gate.weight", "copy")
            for w in ("w1", "w2", "w3"):
                m[q + f"moe.{w}"] = ([p + f"block_sparse_moe.experts.{e}.{w}.weight"
                                      for e in range(cfg.num_experts)], "stack")
    return m


def mistral_names(cfg: ModelConfig) -> dict[str, tuple[str | list[str], str]]:
    """canonical name -> (checkpoint key(s), kind) for the mistral-inference layout."""
    m: dict[str, tuple[str | list[str], str]] = {"embed.weight": ("tok_embeddings.weight", "copy"),
                                                  "norm.weight": ("norm.weight", "copy")}
    if not cfg.tie_word_embeddings:
        m["output.weight"] = ("output.weight", "copy")
    for i in range(cfg.num_layers):
        p = q = f"layers.{i}."
        m[q + "attn_norm.weight"] = (p + "attention_norm.weight", "copy")
        m[q + "ffn_norm.weight"] = (p + "ffn_norm.weight", "copy")
        m[q + "attn.wq.weight"] = (p + "attention.wq.weight", "rope_permute_q")
        m[q + "attn.wk.weight"] = (p + "attention.wk.weight", "rope_permute_k")
        m[q + "attn.wv.weight"] = (p + "attention.wv.weight", "copy")
        m[q + "attn.wo.weight"] = (p + "attention.wo.weight", "copy")
        if not cfg.is_moe:
            for w in ("w1", "w2", "w3"):
                m[q + f"ffn.{w}.weight"] = (p + f"feed_forward.{w}.weight", "copy")
        else:
            m[q + "moe.gate.weight"] = (p + "feed_forward.gate.weight", "copy")
            for w in ("w1", "w2", "w3"):
                m[q + f"moe.{w}"] = ([p + f"feed_forward.experts.{e}.{w}.weight"
                                      for e in range(cfg.num_experts)], "stack")
    return m


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shape of every canonical tensor."""
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    s: dict[str, tuple[int, ...]] = {"embed.weight": (cfg.vocab_size, h), "norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        s["output.weight"] = (cfg.vocab_size, h)
    for n in range(cfg.num_layers):
        q = f"layers.{n}."
        s[q + "attn_norm.weight"] = (h,)
        s[q + "ffn_norm.weight"] = (h,)
        s[q + "attn.wq.weight"] = (cfg.num_heads * d, h)
        s[q + "attn.wk.weight"] = (cfg.num_kv_heads * d, h)
        s[q + "attn.wv.weight"] = (cfg.num_kv_heads * d, h)
        s[q + "attn.wo.weight"] = (h, cfg.num_heads * d)
        if cfg.is_moe:
            e = cfg.num_experts
            s[q + "moe.gate.weight"] = (e, h)
            s[q + "moe.w1"] = (e, i, h)
            s[q + "moe.w2"] = (e, h, i)
            s[q + "moe.w3"] = (e, i, h)
        else:
            s[q + "ffn.w1.weight"] = (i, h)
            s[q + "ffn.w2.weight"] = (h, i)
            s[q + "ffn.w3.weight"] = (i, h)
    return s


def _source_shape(kind: str, refs: tuple[TensorRef, ...]) -> tuple[int, ...]:
    first = refs[0].shape
    if kind == "stack":
        return (len(refs), *first)
    if kind in ("first_half", "second_half"):
        return (first[0], first[1] // 2, *first[2:])
    return first


def mistral_to_half_split(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from interleaved RoPE pairs (mistral-inference) to half-split (HF).

    Within each head, rows (x0, y0, x1, y1, ...) become (x0, x1, ..., y0, y1, ...).
    """
    rows, cols = w.shape
    return w.reshape(heads, rows // heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


class Checkpoint:
    """An indexed checkpoint folder. ``config`` is parsed; tensors are read on demand."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.config = load_config(self.root)
        self.refs = _index_files(self.root, self.config.source_format)
        names = (hf_names(self.config, self.refs) if self.config.source_format == "hf"
                 else mistral_names(self.config))
        self.shapes = expected_shapes(self.config)
        self.sources: dict[str, Source] = {}
        for name, (keys, kind) in names.items():
            key_list = keys if isinstance(keys, list) else [keys]
            refs = []
            for key in key_list:
                if key not in self.refs:
                    raise CheckpointError(f"{self.root}: missing tensor {key!r} (needed for {name})")
                refs.append(self.refs[key])
            heads = {"rope_permute_q": self.config.num_heads, "rope_permute_k": self.config.num_kv_heads}.get(kind, 0)
            src = Source(tuple(refs), "rope_permute" if heads else kind, heads)
            self._check_source(name, src)
            self.sources[name] = src
        used = {ref.key for src in self.sources.values() for ref in src.refs}
        unused = sorted(k for k in self.refs if k not in used and not k.endswith(IGNORED_SUFFIXES))
        if unused:
            ref = self.refs[unused[0]]
            raise CheckpointError(f"{ref.file}: tensor {ref.key!r} (and {len(unused) - 1} more) is not used by the "
                                  f"model the config describes ({self.config.num_layers} layers"
                                  f"{', tied embeddings' if self.config.tie_word_embeddings else ''}); "
                                  f"the config and the checkpoint disagree")
        self.dtype = SAFETENSORS_DTYPES[self.sources["embed.weight"].refs[0].dtype]

    def _check_source(self, name: str, src: Source) -> None:
        for ref in src.refs:
            if ref.dtype not in SAFETENSORS_DTYPES:
                raise CheckpointError(f"{ref.file}: tensor {ref.key!r} has dtype {ref.dtype}; "
                                      f"expected one of {', '.join(SAFETENSORS_DTYPES)}")
            if src.kind == "stack" and ref.shape != src.refs[0].shape:
                raise CheckpointError(f"{ref.file}: tensor {ref.key!r} has shape {list(ref.shape)}, "
                                      f"expected {list(src.refs[0].shape)} like the other experts")
        want = self.shapes[name]
        got = _source_shape(src.kind, src.refs)
        if got != want:
            ref = src.refs[0]
            per = want[1:] if src.kind == "stack" else want
            if src.kind in ("first_half", "second_half"):
                per = (want[0], 2 * want[1], *want[2:])
            raise CheckpointError(f"{ref.file}: tensor {ref.key!r} has shape {list(ref.shape)}, "
                                  f"expected {list(per)} from the config")

    def names(self) -> list[str]:
        return list(self.sources)

    def _read(self, ref: TensorRef) -> torch.Tensor:
        try:
            with safe_open(str(ref.file), framework="pt") as f:
                return f.get_tensor(ref.key)
        except SafetensorError as e:
            raise CheckpointError(f"{ref.file}: cannot read tensor {ref.key!r} ({e})") from None
        except OSError as e:
            raise CheckpointError(f"{ref.file}: cannot read tensor {ref.key!r} ({e.strerror or e})") from None

    def load(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The canonical tensor ``name``, converted to ``dtype`` (default: as stored)."""
        src = self.sources[name]
        if src.kind == "stack":
            first = self._read(src.refs[0])
            out = torch.empty((len(src.refs), *first.shape), dtype=dtype or first.dtype)
            out[0] = first
            for e, ref in enumerate(src.refs[1:], start=1):
                out[e] = self._read(ref)
            return out
        t = self._read(src.refs[0])
        if src.kind == "rope_permute":
            t = mistral_to_half_split(t, src.heads)
        elif src.kind == "first_half":
            t = t[:, : t.shape[1] // 2]
        elif src.kind == "second_half":
            t = t[:, t.shape[1] // 2:]
        if dtype is not None and t.dtype != dtype:
            t = t.to(dtype)
        return t.contiguous()

    def tensors(self, dtype: torch.dtype | None = None) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (canonical name, tensor) one at a time."""
        for name in self.sources:
            yield name, self.load(name, dtype)

    def verify_data(self) -> None:
        """Read every stored tensor once and check it is finite (catches corrupt data past the header)."""
        for ref in {ref for src in self.sources.values() for ref in src.refs}:
            check_finite(ref.key, self._read(ref), ref)


def build_model(ckpt: Checkpoint | str | Path, dtype: torch.dtype | str | None = None,
                device: torch.device | str = "cpu", quantization=None,
                export_dtype: torch.dtype | str | None = None) -> torch.nn.Module:
    """Build a :class:`Transformer` on the meta device and fill it tensor by tensor.

    ``dtype`` defaults to the checkpoint's. Returns the model in eval mode with gradients off.
    ``quantization`` (a manifest's :class:`mtx.manifest.Quantization`): the fake-quant reference of
    that export — every tensor it lists is replaced by its dequantised weight ŵ (docs/ops.md §7),
    quantised from the weight in ``export_dtype`` (default ``dtype``) and held in ``dtype``.
    """
    from mtx.quantize import fake_quantize, reference_specs

    from mtx.models.transformer import Transformer

    if not isinstance(ckpt, Checkpoint):
        ckpt = Checkpoint(ckpt)
    dtype = parse_dtype(dtype) if dtype is not None else ckpt.dtype
    with torch.device("meta"):
        model = Transformer(ckpt.config)
    params = dict(model.named_parameters())
    missing = set(params) - set(ckpt.sources)
    if missing:
        raise CheckpointError(f"{ckpt.root}: no source for {sorted(missing)[0]}")
    specs = reference_specs(quantization)
    quant_dtype = parse_dtype(export_dtype) if export_dtype is not None else dtype
    for name, tensor in ckpt.tensors(dtype):
        if name in specs:
            tensor = fake_quantize(tensor, specs[name], quant_dtype, dtype)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        setattr(module, attr, torch.nn.Parameter(tensor.to(device), requires_grad=False))
    model.inv_freq = model.inv_freq.to(device)
    return model.eval().requires_grad_(False)

"""One model config for the Mistral and Mixtral families.

Reads Hugging Face ``config.json`` (transformers 4 and 5 spellings) and mistral-inference
``params.json``. Defaults for absent optional keys are the ones transformers applies, so a
checkpoint means the same thing here as it does to ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtx.errors import ConfigError

HF_CONFIG = "config.json"
MISTRAL_PARAMS = "params.json"

#: model_type -> (architecture name, default sliding_window) as in transformers.
_HF_FAMILIES: dict[str, tuple[str, int | None]] = {
    "mistral": ("MistralForCausalLM", 4096),
    "mixtral": ("MixtralForCausalLM", None),
}
_ARCH_TO_TYPE = {arch: mt for mt, (arch, _) in _HF_FAMILIES.items()}


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one Mistral-family model.

    ``sliding_window`` is W (a query at position p sees p-W+1..p) or None for full attention.
    ``num_experts == 0`` means a dense SwiGLU FFN (Mistral); otherwise a sparse MoE (Mixtral).
    """

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    sliding_window: int | None
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    bos_token_id: int | None = 1
    eos_token_ids: tuple[int, ...] = (2,)
    source_format: str = "hf"  # "hf" or "mistral": naming and q/k layout of the checkpoint
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["eos_token_ids"] = list(self.eos_token_ids)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, origin: str = "config") -> ModelConfig:
        """Inverse of :meth:`to_dict` (used by manifests)."""
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        missing = sorted(n for n in names if n not in d and cls.__dataclass_fields__[n].default is dataclasses.MISSING)
        if missing:
            raise ConfigError(f"{origin}: missing keys {', '.join(missing)}")
        kw = {k: d[k] for k in names if k in d}
        kw["eos_token_ids"] = tuple(kw.get("eos_token_ids", (2,)))
        cfg = cls(**kw)
        cfg.validate(origin)
        return cfg

    def validate(self, origin: str) -> None:
        def positive(name: str, value: Any) -> None:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{origin}: '{name}' must be a positive integer, got {value!r}")

        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            positive(name, getattr(self, name))
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"{origin}: num_attention_heads ({self.num_heads}) must be a multiple of "
                              f"num_key_value_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ConfigError(f"{origin}: head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_window is not None:
            positive("sliding_window", self.sliding_window)
        if not (self.rope_theta > 0):
            raise ConfigError(f"{origin}: rope_theta must be > 0, got {self.rope_theta!r}")
        if not (self.rms_norm_eps > 0):
            raise ConfigError(f"{origin}: rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.model_type not in _HF_FAMILIES:
            raise ConfigError(f"{origin}: unknown model_type {self.model_type!r}; expected one of "
                              f"{', '.join(sorted(_HF_FAMILIES))}")
        if self.is_moe:
            positive("num_experts_per_tok", self.num_experts_per_tok)
            if self.num_experts_per_tok > self.num_experts:
                raise ConfigError(f"{origin}: num_experts_per_tok ({self.num_experts_per_tok}) exceeds "
                                  f"num_local_experts ({self.num_experts})")
        if self.source_format not in ("hf", "mistral"):
            raise ConfigError(f"{origin}: source_format must be 'hf' or 'mistral'")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read ({e.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a JSON object at top level")
    return data


def _require(d: dict[str, Any], keys: list[str], origin: Path) -> None:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise ConfigError(f"{origin}: missing required key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


def _as_eos(value: Any) -> tuple[int, ...]:
    if value is None:
        return ()
    if isinstance(value, int):
        return (value,)
    return tuple(int(v) for v in value)


def generation_eos_ids(folder: Path, default: tuple[int, ...]) -> tuple[int, ...]:
    """``eos_token_id`` (int or list) of ``folder/generation_config.json`` where it has one, else ``default``.

    transformers' ``generate`` stops on these; a file that is not JSON is ignored.
    """
    path = folder / "generation_config.json"
    if not path.is_file():
        return default
    try:
        value = json.loads(path.read_text()).get("eos_token_id")
    except json.JSONDecodeError:
        return default
    return _as_eos(value) if isinstance(value, (int, list)) else default


def _typed(origin: Path, name: str, value: Any, kind: type) -> Any:
    try:
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{origin}: '{name}' must be a {kind.__name__}, got {value!r}") from None


def from_hf_dict(d: dict[str, Any], origin: Path = Path(HF_CONFIG)) -> ModelConfig:
    """Parse a transformers ``config.json`` dict for MistralForCausalLM / MixtralForCausalLM."""
    model_type = d.get("model_type")
    if model_type is None:
        archs = d.get("architectures") or []
        model_type = next((_ARCH_TO_TYPE[a] for a in archs if a in _ARCH_TO_TYPE), None)
        if model_type is None:
            raise ConfigError(f"{origin}: missing required key model_type")
    if model_type not in _HF_FAMILIES:
        raise ConfigError(f"{origin}: unknown model_type {model_type!r}; mtx supports "
                          f"{', '.join(sorted(_HF_FAMILIES))}")
    _require(d, ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"], origin)

    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{origin}: 'rope_parameters' must be an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{origin}: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    theta = d.get("rope_theta", rope.get("rope_theta", 10000.0))

    heads = _typed(origin, "num_attention_heads", d["num_attention_heads"], int)
    hidden = _typed(origin, "hidden_size", d["hidden_size"], int)
    head_dim = d.get("head_dim") or (hidden // heads if heads else 0)
    sliding = d.get("sliding_window", _HF_FAMILIES[model_type][1])  # present and null: full attention
    is_moe = model_type == "mixtral"
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=_typed(origin, "vocab_size", d["vocab_size"], int),
        hidden_size=hidden,
        intermediate_size=_typed(origin, "intermediate_size", d["intermediate_size"], int),
        num_layers=_typed(origin, "num_hidden_layers", d["num_hidden_layers"], int),
        num_heads=heads,
        num_kv_heads=_typed(origin, "num_key_value_heads", d.get("num_key_value_heads") or heads, int),
        head_dim=_typed(origin, "head_dim", head_dim, int),
        rms_norm_eps=_typed(origin, "rms_norm_eps", d.get("rms_norm_eps", 1e-6), float),
        rope_theta=_typed(origin, "rope_theta", theta, float),
        sliding_window=None if sliding is None else _typed(origin, "sliding_window", sliding, int),
        max_position_embeddings=_typed(origin, "max_position_embeddings",
                                       d.get("max_position_embeddings", 4096 * 32), int),
        tie_word_embeddings=bool(d.get("tie_word_embeddings", False)),
        num_experts=_typed(origin, "num_local_experts", d.get("num_local_experts", 8), int) if is_moe else 0,
        num_experts_per_tok=_typed(origin, "num_experts_per_tok", d.get("num_experts_per_tok", 2), int)
        if is_moe else 0,
        bos_token_id=d.get("bos_token_id", 1),
        eos_token_ids=_as_eos(d.get("eos_token_id", 2)),
        source_format="hf",
        extra={k: d[k] for k in ("dtype", "torch_dtype") if k in d},
    )
    cfg.validate(str(origin))
    return cfg


def from_mistral_params(d: dict[str, Any], origin: Path = Path(MISTRAL_PARAMS)) -> ModelConfig:
    """Parse a mistral-inference ``params.json`` dict.

    ``rope_theta`` defaults to 10000 when absent (as transformers' Mistral conversion does);
    ``moe`` present means a Mixtral-style sparse MoE.
    """
    if d.get("model_type", "transformer") != "transformer":
        raise ConfigError(f"{origin}: unknown model_type {d['model_type']!r}; mtx supports 'transformer'")
    _require(d, ["dim", "n_layers", "hidden_dim", "n_heads", "vocab_size"], origin)
    heads = _typed(origin, "n_heads", d["n_heads"], int)
    dim = _typed(origin, "dim", d["dim"], int)
    moe = d.get("moe")
    if moe is not None and not isinstance(moe, dict):
        raise ConfigError(f"{origin}: 'moe' must be an object with num_experts and num_experts_per_tok")
    if moe is not None:
        _require(moe, ["num_experts", "num_experts_per_tok"], origin)
    cfg = ModelConfig(
        model_type="mixtral" if moe else "mistral",
        vocab_size=_typed(origin, "vocab_size", d["vocab_size"], int),
        hidden_size=dim,
        intermediate_size=_typed(origin, "hidden_dim", d["hidden_dim"], int),
        num_layers=_typed(origin, "n_layers", d["n_layers"], int),
        num_heads=heads,
        num_kv_heads=_typed(origin, "n_kv_heads", d.get("n_kv_heads") or heads, int),
        head_dim=_typed(origin, "head_dim", d.get("head_dim") or (dim // heads if heads else 0), int),
        rms_norm_eps=_typed(origin, "norm_eps", d.get("norm_eps", 1e-5), float),
        rope_theta=_typed(origin, "rope_theta", d.get("rope_theta") or 10000.0, float),
        sliding_window=None if d.get("sliding_window") is None
        else _typed(origin, "sliding_window", d["sliding_window"], int),
        max_position_embeddings=_typed(origin, "max_seq_len", d.get("max_seq_len") or 32768, int),
        tie_word_embeddings=bool(d.get("tied_embeddings", False)),
        num_experts=_typed(origin, "moe.num_experts", moe["num_experts"], int) if moe else 0,
        num_experts_per_tok=_typed(origin, "moe.num_experts_per_tok", moe["num_experts_per_tok"], int)
        if moe else 0,
        bos_token_id=1,
        eos_token_ids=(2,),
        source_format="mistral",
    )
    cfg.validate(str(origin))
    return cfg


def load_config(checkpoint_dir: str | Path) -> ModelConfig:
    """Read the config of a checkpoint folder: ``config.json`` (HF) or else ``params.json``."""
    root = Path(checkpoint_dir)
    if not root.exists():
        raise ConfigError(f"{root}: no such checkpoint folder")
    if not root.is_dir():
        raise ConfigError(f"{root}: expected a checkpoint folder (config.json or params.json and *.safetensors)")
    if (root / HF_CONFIG).is_file():
        return from_hf_dict(_read_json(root / HF_CONFIG), root / HF_CONFIG)
    if (root / MISTRAL_PARAMS).is_file():
        return from_mistral_params(_read_json(root / MISTRAL_PARAMS), root / MISTRAL_PARAMS)
    raise ConfigError(f"{root}: no {HF_CONFIG} or {MISTRAL_PARAMS} found")

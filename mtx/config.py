"""One model config for the Mistral and Mixtral families.

Reads Hugging Face ``config.json`` (transformers 4 and 5 spellings) and mistral-inference
``params.json``. Defaults for absent optional keys are the ones transformers applies, so a
checkpoint means the same thing here as it does to ``AutoModelForCausalLM``.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mtx.errors import ConfigError, MtxError

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
        eos = kw.get("eos_token_ids", [2])
        if not isinstance(eos, (list, tuple)):
            raise ConfigError(f"{origin}: 'eos_token_ids' must be a list of token ids, got {eos!r}")
        kw["eos_token_ids"] = tuple(eos)
        if not isinstance(kw.get("model_type"), str) or not isinstance(kw.get("source_format", "hf"), str):
            raise ConfigError(f"{origin}: 'model_type' and 'source_format' must be strings")
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
        for name in ("rope_theta", "rms_norm_eps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{origin}: '{name}' must be a finite number, got {value!r}")
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
        if not isinstance(self.tie_word_embeddings, bool):
            raise ConfigError(f"{origin}: 'tie_word_embeddings' must be true or false, got {self.tie_word_embeddings!r}")
        ids = list(self.eos_token_ids) + ([] if self.bos_token_id is None else [self.bos_token_id])
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t for t in ids):
            raise ConfigError(f"{origin}: token ids must be integers >= 0, got eos {self.eos_token_ids!r}, "
                              f"bos {self.bos_token_id!r}")


def read_json_object(path: Path, error: type[MtxError] = ConfigError) -> dict[str, Any]:
    """A JSON file that must hold one object; raises ``error`` naming the file for anything else
    (unreadable, not UTF-8, not JSON, nested too deeply, not an object)."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    except RecursionError:
        raise error(f"{path}: JSON nested too deeply") from None
    if not isinstance(data, dict):
        raise error(f"{path}: expected a JSON object at top level, got {type(data).__name__}")
    return data


class _Reader:
    """Typed access to one config dict: each value is checked, never coerced; errors name the key.

    ``int`` means a JSON integer (not a boolean, not a float such as 1.9); ``float`` a JSON number
    (not a boolean); ``bool`` true or false (not "false"). ``None`` (or an absent key) takes the default.
    """

    def __init__(self, d: dict[str, Any], origin: Path, prefix: str = "") -> None:
        self.d, self.origin, self.prefix = d, origin, prefix

    def _bad(self, key: str, want: str, value: Any) -> ConfigError:
        return ConfigError(f"{self.origin}: '{self.prefix}{key}' must be {want}, got {value!r}"[:300])

    def int(self, key: str, default: int | None = None, *, positive: bool = True) -> int | None:
        value = self.d.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or (positive and value <= 0):
            raise self._bad(key, "a positive integer" if positive else "an integer", value)
        return value

    def float(self, key: str, default: float) -> float:
        value = self.d.get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise self._bad(key, "a positive number", value)
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        value = self.d.get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise self._bad(key, "true or false", value)
        return value

    def token_ids(self, key: str, default: tuple[int, ...]) -> tuple[int, ...]:
        """A token id or a list of them (``eos_token_id``); null or absent: ``default``."""
        if key not in self.d:
            return default
        value = self.d[key]
        if value is None:
            return ()
        items = value if isinstance(value, list) else [value]
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in items):
            raise self._bad(key, "a token id or a list of token ids", value)
        return tuple(items)


def _require(d: dict[str, Any], keys: list[str], origin: Path) -> None:
    missing = [k for k in keys if d.get(k) is None]
    if missing:
        raise ConfigError(f"{origin}: missing required key{'s' if len(missing) > 1 else ''} {', '.join(missing)}")


GENERATION_CONFIG = "generation_config.json"


def generation_eos_ids(folder: Path, default: tuple[int, ...]) -> tuple[int, ...]:
    """``eos_token_id`` (int or list) of ``folder/generation_config.json`` where it has one, else ``default``.

    transformers' ``generate`` stops on these. A malformed file is an error naming it (checked at
    export and again at load).
    """
    path = folder / GENERATION_CONFIG
    if not path.is_file():
        return default
    return _Reader(read_json_object(path), path).token_ids("eos_token_id", default) or default


def from_hf_dict(d: dict[str, Any], origin: Path = Path(HF_CONFIG)) -> ModelConfig:
    """Parse a transformers ``config.json`` dict for MistralForCausalLM / MixtralForCausalLM."""
    model_type = d.get("model_type")
    if model_type is None:
        archs = d.get("architectures") or []
        if not isinstance(archs, list):
            raise ConfigError(f"{origin}: 'architectures' must be a list of names")
        model_type = next((_ARCH_TO_TYPE[a] for a in archs if isinstance(a, str) and a in _ARCH_TO_TYPE), None)
        if model_type is None:
            raise ConfigError(f"{origin}: missing required key model_type")
    if not isinstance(model_type, str) or model_type not in _HF_FAMILIES:
        raise ConfigError(f"{origin}: unknown model_type {model_type!r}; mtx supports "
                          f"{', '.join(sorted(_HF_FAMILIES))}")
    _require(d, ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"], origin)
    r = _Reader(d, origin)

    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{origin}: 'rope_parameters' must be an object")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConfigError(f"{origin}: rope_type {rope_type!r} is not supported (only 'default' RoPE)")
    theta = r.float("rope_theta", _Reader(rope, origin, "rope_parameters.").float("rope_theta", 10000.0))

    heads = r.int("num_attention_heads")
    hidden = r.int("hidden_size")
    assert heads is not None and hidden is not None  # required above
    if "sliding_window" in d and d["sliding_window"] is None:
        window = None  # present and null: full attention
    else:
        window = r.int("sliding_window", _HF_FAMILIES[model_type][1])
    is_moe = model_type == "mixtral"
    cfg = ModelConfig(
        model_type=model_type,
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.int("intermediate_size"),
        num_layers=r.int("num_hidden_layers"),
        num_heads=heads,
        num_kv_heads=r.int("num_key_value_heads", heads),
        head_dim=r.int("head_dim", hidden // heads),
        rms_norm_eps=r.float("rms_norm_eps", 1e-6),
        rope_theta=theta,
        sliding_window=window,
        max_position_embeddings=r.int("max_position_embeddings", 4096 * 32),
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        num_experts=r.int("num_local_experts", 8) if is_moe else 0,
        num_experts_per_tok=r.int("num_experts_per_tok", 2) if is_moe else 0,
        bos_token_id=r.int("bos_token_id", None, positive=False) if "bos_token_id" in d else 1,
        eos_token_ids=r.token_ids("eos_token_id", (2,)),
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
    r = _Reader(d, origin)
    heads = r.int("n_heads")
    dim = r.int("dim")
    assert heads is not None and dim is not None  # required above
    moe = d.get("moe")
    if moe is not None and not isinstance(moe, dict):
        raise ConfigError(f"{origin}: 'moe' must be an object with num_experts and num_experts_per_tok")
    if moe is not None:
        _require(moe, ["num_experts", "num_experts_per_tok"], origin)
    m = _Reader(moe or {}, origin, "moe.")
    cfg = ModelConfig(
        model_type="mixtral" if moe else "mistral",
        vocab_size=r.int("vocab_size"),
        hidden_size=dim,
        intermediate_size=r.int("hidden_dim"),
        num_layers=r.int("n_layers"),
        num_heads=heads,
        num_kv_heads=r.int("n_kv_heads", heads),
        head_dim=r.int("head_dim", dim // heads),
        rms_norm_eps=r.float("norm_eps", 1e-5),
        rope_theta=r.float("rope_theta", 10000.0),
        sliding_window=r.int("sliding_window", None),
        max_position_embeddings=r.int("max_seq_len", 32768),
        tie_word_embeddings=r.bool("tied_embeddings", False),
        num_experts=m.int("num_experts") if moe else 0,
        num_experts_per_tok=m.int("num_experts_per_tok") if moe else 0,
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
        return from_hf_dict(read_json_object(root / HF_CONFIG), root / HF_CONFIG)
    if (root / MISTRAL_PARAMS).is_file():
        return from_mistral_params(read_json_object(root / MISTRAL_PARAMS), root / MISTRAL_PARAMS)
    raise ConfigError(f"{root}: no {HF_CONFIG} or {MISTRAL_PARAMS} found")

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
from typing import Any, Callable

from mtx.errors import ConfigError, MtxError

HF_CONFIG = "config.json"
MISTRAL_PARAMS = "params.json"

#: The model families of mtx (ModelConfig.model_type).
_HF_FAMILIES = ("mistral", "mixtral")
#: transformers model_type -> (mtx family, architecture, default sliding_window, rope_theta, rms_norm_eps),
#: the defaults being those of transformers' config class. A Ministral is a Mistral whose layers may
#: differ in their attention window (``layer_types``): ModelConfig.layer_windows.
_HF_TYPES: dict[str, tuple[str, str, int | None, float, float]] = {
    "mistral": ("mistral", "MistralForCausalLM", 4096, 10000.0, 1e-6),
    "mixtral": ("mixtral", "MixtralForCausalLM", None, 1000000.0, 1e-5),
    "ministral": ("mistral", "MinistralForCausalLM", 4096, 10000.0, 1e-6),
}
_ARCH_TO_TYPE = {arch: mt for mt, (_, arch, *_) in _HF_TYPES.items()}

# --------------------------------------------------------------------------------------------------
# The config keys mtx knows, and what each does here.
#
# IMPLEMENTED: read into a ModelConfig field (``accepts``, where set, bounds the values implemented).
# IRRELEVANT: read by transformers (or mistral-inference) but without effect on inference logits.
# REFUSED: a value other than the neutral one (``accepts``) is a ConfigError naming the key and file.
# Keys in no table are ignored: transformers' Mistral classes do not read them either (they only
# become attributes), so they change nothing in the oracle; likewise params.json keys outside
# PARAMS_KEYS (but a ``moe`` sub-key outside MOE_KEYS is refused). tests/test_config_keys.py derives
# the keys transformers reads from its config classes and fails on any missing here.

IMPLEMENTED, IRRELEVANT, REFUSED = "implemented", "irrelevant", "refused"

Accepts = Callable[[Any, dict[str, Any]], bool]


@dataclass(frozen=True)
class Key:
    """What one config key does in mtx: ``status``, and ``note`` (the field it sets, why it does not
    matter, or what mtx lacks: the refusal says it). ``accepts(value, config)`` -> value usable."""

    status: str
    note: str
    accepts: Accepts | None = None


def _null_or(*neutral: Any) -> Accepts:
    """null, or one of ``neutral`` (same JSON type: true is not 1)."""
    return lambda v, d: v is None or any(type(v) is type(n) and v == n for n in neutral)


def _falsy_or_null(v: Any, d: dict[str, Any]) -> bool:
    return v is None or v is False or v == {} or v == []


def _unit_factor(v: Any, d: dict[str, Any]) -> bool:
    return v is None or (not isinstance(v, bool) and isinstance(v, (int, float)) and v == 1)


def _window_off(v: Any, d: dict[str, Any]) -> bool:
    """use_sliding_window (Qwen2 spelling): true, or false with no sliding_window to switch off."""
    return v is None or v is True or (v is False and d.get("sliding_window") is None)


def _all_windowed(v: Any, d: dict[str, Any]) -> bool:
    """max_window_layers (Qwen2 spelling: layers below it attend fully): 0, or no window at all."""
    return v is None or (type(v) is int and v == 0) or d.get("sliding_window") is None


_LAYER_TYPES = {"sliding_attention": "sliding_attention", "full_attention": "full_attention",
                "attention": "full_attention"}  # transformers' legacy "attention" is full attention


def _known_layer_types(v: Any, d: dict[str, Any]) -> bool:
    """A list of 'sliding_attention' / 'full_attention' (one per layer); mixed kinds only for Ministral,
    the one family whose transformers class reads them (Mistral and Mixtral ignore layer_types)."""
    if v is None:
        return True
    if not (isinstance(v, list) and bool(v) and all(isinstance(t, str) and t in _LAYER_TYPES for t in v)):
        return False
    ministral = d.get("model_type") == "ministral" or (
        d.get("model_type") is None and "MinistralForCausalLM" in (d.get("architectures") or []))
    return ministral or len({_LAYER_TYPES[t] for t in v}) == 1


_PER_LAYER = "per-layer attention windows: Ministral's layer_types only (transformers' Qwen2 spelling is not read)"

#: config.json (transformers) keys of MistralConfig, MixtralConfig, MinistralConfig and
#: PreTrainedConfig, and the keys of other families that would change the model if mtx ignored them.
HF_KEYS: dict[str, Key] = {
    # -- implemented
    "model_type": Key(IMPLEMENTED, "model_type: mistral, mixtral; ministral reads as mistral with per-layer "
                                   "windows (layer_windows)"),
    "architectures": Key(IMPLEMENTED, "model_type where model_type is absent"),
    "vocab_size": Key(IMPLEMENTED, "vocab_size"),
    "hidden_size": Key(IMPLEMENTED, "hidden_size"),
    "intermediate_size": Key(IMPLEMENTED, "intermediate_size"),
    "num_hidden_layers": Key(IMPLEMENTED, "num_layers"),
    "num_attention_heads": Key(IMPLEMENTED, "num_heads"),
    "num_key_value_heads": Key(IMPLEMENTED, "num_kv_heads (absent: 8, transformers' default; null: num_attention_heads)"),
    "head_dim": Key(IMPLEMENTED, "head_dim (default hidden_size / num_attention_heads)"),
    "hidden_act": Key(IMPLEMENTED, "the mtx MLP and MoE ops compute SiLU (SwiGLU) only",
                      _null_or("silu", "swish")),
    "rms_norm_eps": Key(IMPLEMENTED, "rms_norm_eps (default 1e-6; Mixtral 1e-5)"),
    "rope_parameters": Key(IMPLEMENTED, "rope_theta, and rope_linear_factor; rope_type 'default' or 'linear'"),
    "rope_scaling": Key(IMPLEMENTED, "the transformers 4 spelling of rope_parameters; when set it replaces "
                                     "rope_parameters, as in transformers"),
    "rope_theta": Key(IMPLEMENTED, "rope_theta where the RoPE object has none (default 1e4; Mixtral 1e6)"),
    "partial_rotary_factor": Key(REFUSED, "mtx rotates the whole head (partial_rotary_factor 1)", _unit_factor),
    "sliding_window": Key(IMPLEMENTED, "sliding_window (null: full attention)"),
    "layer_types": Key(IMPLEMENTED, "the window of each layer (Ministral: sliding_attention -> sliding_window, "
                                    "full_attention -> none; layer_windows when they differ); Mistral and Mixtral "
                                    "ignore it in transformers, so there it must be uniform and agree with "
                                    "sliding_window", _known_layer_types),
    "max_position_embeddings": Key(IMPLEMENTED, "max_position_embeddings"),
    "tie_word_embeddings": Key(IMPLEMENTED, "tie_word_embeddings"),
    "num_local_experts": Key(IMPLEMENTED, "num_experts (Mixtral)"),
    "num_experts": Key(IMPLEMENTED, "num_experts: MixtralConfig's alias of num_local_experts (it wins)"),
    "num_experts_per_tok": Key(IMPLEMENTED, "num_experts_per_tok (Mixtral)"),
    "bos_token_id": Key(IMPLEMENTED, "bos_token_id"),
    "eos_token_id": Key(IMPLEMENTED, "eos_token_ids (generation_config.json's win at run time)"),
    "dtype": Key(IMPLEMENTED, "recorded (extra); the export dtype is --dtype"),
    "torch_dtype": Key(IMPLEMENTED, "recorded (extra); the transformers 4 spelling of dtype"),
    # -- read by transformers, no effect on inference
    "transformers_version": Key(IRRELEVANT, "provenance"),
    "output_hidden_states": Key(IRRELEVANT, "what forward() returns, not the logits"),
    "output_attentions": Key(IRRELEVANT, "what forward() returns, not the logits"),
    "return_dict": Key(IRRELEVANT, "what forward() returns, not the logits"),
    "use_cache": Key(IRRELEVANT, "transformers' KV cache switch; mtx always caches"),
    "chunk_size_feed_forward": Key(IRRELEVANT, "not read by the Mistral models"),
    "id2label": Key(IRRELEVANT, "classification heads only"),
    "label2id": Key(IRRELEVANT, "classification heads only"),
    "num_labels": Key(IRRELEVANT, "classification heads only"),
    "problem_type": Key(IRRELEVANT, "classification heads only"),
    "initializer_range": Key(IRRELEVANT, "random initialisation only"),
    "pad_token_id": Key(IRRELEVANT, "the embedding's padding_idx: gradients only"),
    "attention_dropout": Key(IRRELEVANT, "dropout is off at inference (any value accepted)"),
    "router_jitter_noise": Key(IRRELEVANT, "training only (Mixtral router noise)"),
    "output_router_logits": Key(IRRELEVANT, "training only (auxiliary loss)"),
    "router_aux_loss_coef": Key(IRRELEVANT, "training only (auxiliary loss)"),
    "attn_implementation": Key(IRRELEVANT, "kernel choice, same mathematics"),
    "_attn_implementation": Key(IRRELEVANT, "kernel choice, same mathematics"),
    "_attn_implementation_internal": Key(IRRELEVANT, "kernel choice, same mathematics"),
    "experts_implementation": Key(IRRELEVANT, "kernel choice, same mathematics"),
    "_experts_implementation": Key(IRRELEVANT, "kernel choice, same mathematics"),
    "_experts_implementation_internal": Key(IRRELEVANT, "kernel choice, same mathematics"),
    "name_or_path": Key(IRRELEVANT, "provenance"),
    "_name_or_path": Key(IRRELEVANT, "provenance"),
    "_commit_hash": Key(IRRELEVANT, "provenance"),
    # -- refused unless neutral
    "is_encoder_decoder": Key(REFUSED, "Mistral-family models are decoder-only", _null_or(False)),
    "per_layer_config": Key(REFUSED, "per-layer config overrides are not supported", _falsy_or_null),
    "quantization_config": Key(REFUSED, "quantized checkpoints are not supported: export the unquantized "
                                        "weights (mtx export --quantize quantizes)", _falsy_or_null),
    "attention_bias": Key(REFUSED, "the attention projections have no bias in this family", _null_or(False)),
    "mlp_bias": Key(REFUSED, "the FFN projections have no bias in this family", _null_or(False)),
    "use_sliding_window": Key(REFUSED, "false with a sliding_window set is ambiguous (transformers' Mistral "
                                       "ignores it and uses the window); remove one of them", _window_off),
    "max_window_layers": Key(REFUSED, _PER_LAYER, _all_windowed),
}

_DEFAULT_ROPE = ("only default and linear RoPE are implemented (no dynamic, yarn, longrope or llama3 "
                 "scaling)")

#: rope_parameters / rope_scaling sub-keys; any other sub-key is only read by scaled RoPE types.
ROPE_KEYS: dict[str, Key] = {
    "rope_type": Key(IMPLEMENTED, _DEFAULT_ROPE, _null_or("default", "linear")),
    "type": Key(IMPLEMENTED, f"{_DEFAULT_ROPE} (type is rope_type's older spelling)", _null_or("default", "linear")),
    "factor": Key(IMPLEMENTED, "rope_linear_factor with rope_type 'linear' (required there); unread by default RoPE"),
    "rope_theta": Key(IMPLEMENTED, "rope_theta (wins over the top-level rope_theta, as in transformers)"),
    "partial_rotary_factor": Key(REFUSED, "mtx rotates the whole head (partial_rotary_factor 1)", _unit_factor),
}

#: params.json (mistral-inference TransformerArgs) keys.
PARAMS_KEYS: dict[str, Key] = {
    "model_type": Key(IMPLEMENTED, "'transformer' only"),
    "dim": Key(IMPLEMENTED, "hidden_size"),
    "n_layers": Key(IMPLEMENTED, "num_layers"),
    "head_dim": Key(IMPLEMENTED, "head_dim (default dim / n_heads)"),
    "hidden_dim": Key(IMPLEMENTED, "intermediate_size"),
    "n_heads": Key(IMPLEMENTED, "num_heads"),
    "n_kv_heads": Key(IMPLEMENTED, "num_kv_heads (default n_heads)"),
    "norm_eps": Key(IMPLEMENTED, "rms_norm_eps (default 1e-5)"),
    "vocab_size": Key(IMPLEMENTED, "vocab_size"),
    "rope_theta": Key(IMPLEMENTED, "rope_theta (default 1e4, as transformers' conversion script)"),
    "sliding_window": Key(IMPLEMENTED, "sliding_window; a list is mistral-inference's per-layer pattern, "
                                       "repeated over the layers (its length divides n_layers; null entries: "
                                       "full attention) -> layer_windows",
                          lambda v, d: not isinstance(v, list) or (
                              bool(v) and all(x is None or (type(x) is int and x > 0) for x in v))),
    "max_seq_len": Key(IMPLEMENTED, "max_position_embeddings (default 32768)"),
    "tied_embeddings": Key(IMPLEMENTED, "tie_word_embeddings"),
    "moe": Key(IMPLEMENTED, "num_experts, num_experts_per_tok (Mixtral-style MoE)"),
    "max_batch_size": Key(IRRELEVANT, "mistral-inference's cache allocation"),
    "lora": Key(REFUSED, "LoRA adapters are not supported: merge them into the weights first",
                lambda v, d: v is None or (isinstance(v, dict) and v.get("enable") is False)),
    "quantization": Key(REFUSED, "quantized checkpoints are not supported: export the unquantized weights",
                        _falsy_or_null),
    "vision_encoder": Key(REFUSED, "vision encoders (Pixtral) are not supported", _falsy_or_null),
    "yarn": Key(REFUSED, "only default RoPE is implemented (no YaRN scaling)", _falsy_or_null),
    "llama_4_scaling": Key(REFUSED, "attention temperature scaling is not supported", _falsy_or_null),
}

#: params.json ``moe`` sub-keys; any other is refused (shared experts, expert groups, dense first layers
#: and routing scales all change the model).
MOE_KEYS: dict[str, Key] = {
    "num_experts": Key(IMPLEMENTED, "num_experts"),
    "num_experts_per_tok": Key(IMPLEMENTED, "num_experts_per_tok"),
}


def _check_keys(d: dict[str, Any], table: dict[str, Key], origin: Path, prefix: str = "",
                strict: bool = False) -> None:
    """Raise for the first key of ``d`` whose value ``table`` does not accept (``strict``: or that
    ``table`` does not list): one line naming the key, its value and why."""
    for key, value in d.items():
        spec = table.get(key)
        if spec is None:
            if strict:
                raise ConfigError(f"{origin}: '{prefix}{key}' is not supported (mtx knows "
                                  f"{', '.join(prefix + k for k in table)})"[:300])
            continue
        if spec.accepts is not None and not spec.accepts(value, d):
            raise ConfigError(f"{origin}: '{prefix}{key}' = {_short(value)} is not supported: {spec.note}"[:400])


def _compact(value: Any) -> str:
    """``value`` as compact JSON (the C++ manifest reader's words), or its repr if not JSON."""
    try:
        return json.dumps(value, separators=(",", ":"))
    except TypeError:
        return repr(value)


def _short(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of one Mistral-family model.

    ``sliding_window`` is W (a query at position p sees p-W+1..p) or None for full attention.
    ``num_experts == 0`` means a dense SwiGLU FFN (Mistral); otherwise a sparse MoE (Mixtral).
    ``rope_linear_factor`` is transformers' linear RoPE scaling (1: default RoPE); :meth:`to_dict`
    leaves it out at 1, so manifests of unscaled models keep their keys.
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
    rope_linear_factor: float = 1.0  # linear RoPE scaling: positions divided by it (inv_freq / factor)
    #: Per-layer windows (0: full attention) where layers differ (Ministral), else () and every layer has
    #: ``sliding_window``. Invariant: never uniform, and ``sliding_window`` is the largest entry (None if all 0).
    layer_windows: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    @property
    def windows(self) -> tuple[int, ...]:
        """The attention window of each layer (0: full attention), one entry per layer."""
        return self.layer_windows or (self.sliding_window or 0,) * self.num_layers

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("extra")
        d["eos_token_ids"] = list(self.eos_token_ids)
        if self.rope_linear_factor == 1.0:
            d.pop("rope_linear_factor")
        if self.layer_windows:
            d["layer_windows"] = list(self.layer_windows)
        else:
            d.pop("layer_windows")
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
        windows = kw.get("layer_windows", [])
        if not isinstance(windows, (list, tuple)):
            raise ConfigError(f"{origin}: 'layer_windows' must be a list of windows, got {windows!r}")
        kw["layer_windows"] = tuple(windows)
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
        if self.layer_windows:
            w = self.layer_windows
            if len(w) != self.num_layers or not all(type(x) is int and x >= 0 for x in w):
                raise ConfigError(f"{origin}: 'layer_windows' must be {self.num_layers} integers >= 0 (one window "
                                  f"per layer, 0 = full attention), got {_compact(list(w))}"[:300])
            if len(set(w)) == 1:
                raise ConfigError(f"{origin}: 'layer_windows' is uniform ({w[0]}); give sliding_window instead")
            if self.sliding_window != (max(w) or None):
                raise ConfigError(f"{origin}: 'sliding_window' must be the largest layer window "
                                  f"({_compact(max(w) or None)}), got {_compact(self.sliding_window)}")
        for name in ("rope_theta", "rms_norm_eps", "rope_linear_factor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"{origin}: '{name}' must be a finite number, got {value!r}")
        if not (self.rope_theta > 0):
            raise ConfigError(f"{origin}: rope_theta must be > 0, got {self.rope_theta!r}")
        if not (self.rms_norm_eps > 0):
            raise ConfigError(f"{origin}: rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if not (self.rope_linear_factor > 0):
            raise ConfigError(f"{origin}: rope_linear_factor must be > 0, got {self.rope_linear_factor!r}")
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


def _rope(d: dict[str, Any], origin: Path, default_theta: float) -> tuple[float, float]:
    """(rope_theta, rope_linear_factor) of a config.json, read as transformers does: ``rope_scaling``
    (when set) replaces ``rope_parameters``; the object's ``rope_theta`` wins over the top-level one;
    rope_type 'default' or 'linear' (whose ``factor`` divides the frequencies)."""
    key = "rope_scaling" if d.get("rope_scaling") else "rope_parameters"
    rope = d.get(key) or {}
    if not isinstance(rope, dict):
        raise ConfigError(f"{origin}: '{key}' must be an object, got {_short(rope)}")
    nested = sorted(k for k, v in rope.items() if isinstance(v, dict))
    if nested:
        raise ConfigError(f"{origin}: '{key}.{nested[0]}': RoPE parameters per layer type are not supported")
    # rope_type wins over its older spelling type, as in transformers: check the one that counts
    _check_keys({k: v for k, v in rope.items() if not (k == "type" and "rope_type" in rope)}, ROPE_KEYS,
                origin, f"{key}.")
    if "partial_rotary_factor" not in rope:
        _check_keys({k: d[k] for k in ("partial_rotary_factor",) if k in d}, HF_KEYS, origin)
    top = _Reader(d, origin).float("rope_theta", default_theta)
    sub = _Reader(rope, origin, f"{key}.")
    factor = 1.0
    if "rope_type" in rope and rope["rope_type"] is None:  # transformers fails on it (KeyError: None)
        raise ConfigError(f"{origin}: '{key}.rope_type' is null; give 'default' or 'linear'")
    if rope.get("rope_type", rope.get("type")) == "linear":
        if rope.get("factor") is None:
            raise ConfigError(f"{origin}: '{key}.factor' is required with rope_type 'linear'")
        factor = sub.float("factor", 1.0)
    return sub.float("rope_theta", top), factor


def _hf_window(d: dict[str, Any], model_type: str, origin: Path, default: int | None
               ) -> tuple[int | None, tuple[int, ...]]:
    """(sliding_window, layer_windows): ``sliding_window``, with Ministral's ``layer_types`` (a layer
    ``sliding_attention`` has the window, ``full_attention`` none), as transformers' Ministral reads
    them. Mistral and Mixtral ignore layer_types in transformers, so there it must be uniform (the key
    table) and agree with sliding_window."""
    if "sliding_window" in d and d["sliding_window"] is None:
        window = None  # present and null: full attention
    else:
        window = _Reader(d, origin).int("sliding_window", default)
    kinds = d.get("layer_types")
    if kinds is None:
        return window, ()
    kind = _LAYER_TYPES[kinds[0]]
    if model_type == "ministral":
        layers = _Reader(d, origin).int("num_hidden_layers")
        if layers is not None and len(kinds) != layers:
            raise ConfigError(f"{origin}: 'layer_types' has {len(kinds)} entries for {layers} layers")
        sliding = [_LAYER_TYPES[t] == "sliding_attention" for t in kinds]
        if any(sliding) and window is None:
            raise ConfigError(f"{origin}: 'layer_types' has sliding_attention layers but sliding_window is null")
        windows = tuple(window if s else 0 for s in sliding)
        if len(set(windows)) == 1:
            return (window if sliding[0] else None), ()
        return window, windows
    if (kind == "sliding_attention") != (window is not None):
        raise ConfigError(f"{origin}: 'layer_types' ({kind}) disagrees with sliding_window ({window}); "
                          f"transformers' {model_type} ignores layer_types")
    return window, ()


def from_hf_dict(d: dict[str, Any], origin: Path = Path(HF_CONFIG)) -> ModelConfig:
    """Parse a transformers ``config.json`` dict for Mistral / Mixtral / Ministral (uniform windows).

    Every key in :data:`HF_KEYS` is implemented, irrelevant, or refused unless neutral; keys not
    listed are ignored, as transformers' Mistral classes ignore them.
    """
    model_type = d.get("model_type")
    if model_type is None:
        archs = d.get("architectures") or []
        if not isinstance(archs, list):
            raise ConfigError(f"{origin}: 'architectures' must be a list of names")
        model_type = next((_ARCH_TO_TYPE[a] for a in archs if isinstance(a, str) and a in _ARCH_TO_TYPE), None)
        if model_type is None:
            raise ConfigError(f"{origin}: missing required key model_type")
    if not isinstance(model_type, str) or model_type not in _HF_TYPES:
        raise ConfigError(f"{origin}: unknown model_type {model_type!r}; mtx supports "
                          f"{', '.join(sorted(_HF_TYPES))}")
    family, _, default_window, default_theta, default_eps = _HF_TYPES[model_type]
    _require(d, ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"], origin)
    _check_keys(d, HF_KEYS, origin)
    r = _Reader(d, origin)
    theta, linear_factor = _rope(d, origin, default_theta)

    heads = r.int("num_attention_heads")
    hidden = r.int("hidden_size")
    assert heads is not None and hidden is not None  # required above
    window, layer_windows = _hf_window(d, model_type, origin, default_window)
    is_moe = family == "mixtral"
    experts = (r.int("num_experts") or r.int("num_local_experts", 8)) if is_moe else 0
    cfg = ModelConfig(
        model_type=family,
        vocab_size=r.int("vocab_size"),
        hidden_size=hidden,
        intermediate_size=r.int("intermediate_size"),
        num_layers=r.int("num_hidden_layers"),
        num_heads=heads,
        # transformers: absent -> 8 (the config classes' default); null -> num_attention_heads (4.x)
        num_kv_heads=heads if "num_key_value_heads" in d and d["num_key_value_heads"] is None
        else r.int("num_key_value_heads", 8),
        head_dim=r.int("head_dim", hidden // heads),
        rms_norm_eps=r.float("rms_norm_eps", default_eps),
        rope_theta=theta,
        sliding_window=window,
        max_position_embeddings=r.int("max_position_embeddings", 4096 * 32),
        tie_word_embeddings=r.bool("tie_word_embeddings", False),
        num_experts=experts,
        num_experts_per_tok=r.int("num_experts_per_tok", 2) if is_moe else 0,
        bos_token_id=r.int("bos_token_id", None, positive=False) if "bos_token_id" in d else 1,
        eos_token_ids=r.token_ids("eos_token_id", (2,)),
        source_format="hf",
        extra={k: d[k] for k in ("dtype", "torch_dtype") if k in d},
        rope_linear_factor=linear_factor,
        layer_windows=layer_windows,
    )
    cfg.validate(str(origin))
    return cfg


def from_mistral_params(d: dict[str, Any], origin: Path = Path(MISTRAL_PARAMS)) -> ModelConfig:
    """Parse a mistral-inference ``params.json`` dict (keys: :data:`PARAMS_KEYS`, :data:`MOE_KEYS`).

    ``rope_theta`` defaults to 10000 when absent (as transformers' Mistral conversion does);
    ``moe`` present means a Mixtral-style sparse MoE.
    """
    if d.get("model_type", "transformer") != "transformer":
        raise ConfigError(f"{origin}: unknown model_type {d['model_type']!r}; mtx supports 'transformer'")
    _require(d, ["dim", "n_layers", "hidden_dim", "n_heads", "vocab_size"], origin)
    _check_keys(d, PARAMS_KEYS, origin)
    r = _Reader(d, origin)
    heads = r.int("n_heads")
    dim = r.int("dim")
    assert heads is not None and dim is not None  # required above
    moe = d.get("moe")
    if moe is not None and not isinstance(moe, dict):
        raise ConfigError(f"{origin}: 'moe' must be an object with num_experts and num_experts_per_tok")
    if moe is not None:
        _require(moe, ["num_experts", "num_experts_per_tok"], origin)
        _check_keys(moe, MOE_KEYS, origin, "moe.", strict=True)
    m = _Reader(moe or {}, origin, "moe.")
    window, layer_windows = d.get("sliding_window"), ()
    if isinstance(window, list):  # mistral-inference's per-layer pattern (entries checked by the key table)
        layers = r.int("n_layers")
        assert layers is not None  # required above
        if layers % len(window):
            raise ConfigError(f"{origin}: 'sliding_window' has {len(window)} entries, which does not divide "
                              f"n_layers {layers} (the pattern is repeated over the layers)")
        windows = tuple(w or 0 for w in window) * (layers // len(window))
        layer_windows = windows if len(set(windows)) > 1 else ()
        r = _Reader({**d, "sliding_window": max(windows) or None}, origin)
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
        layer_windows=layer_windows,
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

"""Config parsing: both spellings of rope_theta, head_dim, null window, params.json; clear errors."""

from __future__ import annotations

import json

import pytest

from mtx.config import load_config
from mtx.errors import ConfigError


def write(tmp_path, name, data):
    (tmp_path / name).write_text(json.dumps(data))
    return tmp_path


BASE = {"model_type": "mistral", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}


def test_rope_theta_spellings(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = load_config(write(tmp_path / "a", "config.json", {**BASE, "rope_theta": 1e6}))
    b = load_config(write(tmp_path / "b", "config.json",
                          {**BASE, "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}}))
    assert a.rope_theta == b.rope_theta == 1e6


def test_hf_defaults_follow_transformers(tmp_path):
    from transformers import MistralConfig, MixtralConfig

    cfg = load_config(write(tmp_path, "config.json", BASE))
    hf = MistralConfig(**{k: v for k, v in BASE.items() if k != "model_type"})
    assert cfg.sliding_window == hf.sliding_window
    assert cfg.rms_norm_eps == hf.rms_norm_eps
    assert cfg.rope_theta == hf.rope_parameters["rope_theta"]
    assert cfg.head_dim == hf.head_dim
    write(tmp_path, "config.json", {**BASE, "model_type": "mixtral"})
    cfg = load_config(tmp_path)
    hf = MixtralConfig(**{k: v for k, v in BASE.items() if k != "model_type"})
    assert cfg.sliding_window == hf.sliding_window
    assert (cfg.num_experts, cfg.num_experts_per_tok) == (hf.num_local_experts, hf.num_experts_per_tok)


def test_explicit_head_dim_and_null_window(tmp_path):
    cfg = load_config(write(tmp_path, "config.json", {**BASE, "head_dim": 32, "sliding_window": None}))
    assert cfg.head_dim == 32 and cfg.sliding_window is None


def test_params_json(tmp_path):
    cfg = load_config(write(tmp_path, "params.json", {
        "dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
        "norm_eps": 1e-5, "vocab_size": 100, "rope_theta": 1e6, "sliding_window": 32,
        "moe": {"num_experts": 8, "num_experts_per_tok": 2}}))
    assert cfg.model_type == "mixtral" and cfg.num_experts == 8 and cfg.sliding_window == 32
    assert cfg.source_format == "mistral"


@pytest.mark.parametrize("data,needle", [
    ({**BASE, "model_type": "llama"}, "unknown model_type 'llama'"),
    ({k: v for k, v in BASE.items() if k != "hidden_size"}, "missing required key hidden_size"),
    ({**BASE, "num_key_value_heads": 3}, "multiple of"),
    ({**BASE, "rope_parameters": {"rope_type": "yarn", "factor": 2.0}}, "'rope_parameters.rope_type' = 'yarn' is not supported"),
    ({**BASE, "sliding_window": -4}, "sliding_window"),
])
def test_config_errors(tmp_path, data, needle):
    write(tmp_path, "config.json", data)
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert needle in str(e.value)
    assert str(tmp_path / "config.json") in str(e.value)


def test_no_config(tmp_path):
    with pytest.raises(ConfigError, match="no config.json or params.json"):
        load_config(tmp_path)

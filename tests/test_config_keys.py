"""Every config key transformers reads is implemented, irrelevant, or refused in one line (mtx.config's
key tables); implemented keys at non-default values give transformers' logits; refused ones exit 2.

Also: ``mtx inspect`` checks the tokenizer files as export does, and a tokenizer that panics in Rust
(a catastrophic pre-tokenizer regex) leaves exactly one line on stderr.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import hf_logits
from mtx import config as mtx_config
from mtx.config import HF_KEYS, IMPLEMENTED, IRRELEVANT, MOE_KEYS, PARAMS_KEYS, REFUSED, ROPE_KEYS, load_config
from mtx.errors import ConfigError
from mtx.models import build_model
from test_parity_hf import ATOL, SEQ, run_chunked

BASE = {"model_type": "mistral", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
PARAMS = {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
          "norm_eps": 1e-5, "vocab_size": 100}


def transformers_keys() -> dict[str, set[str]]:
    """The config.json keys transformers' Mistral, Mixtral and Ministral configs read: their fields,
    to_dict() of a default config, attribute_map aliases, and the kwargs PreTrainedConfig pops (by name)
    in __post_init__ and in the RoPE standardisation. Generation defaults it pops are left out: they
    are generate() options, which mtx takes from generation_config.json."""
    from transformers import MinistralConfig, MistralConfig, MixtralConfig, PreTrainedConfig
    from transformers.generation import GenerationConfig

    popped: set[str] = set()
    for fn in (PreTrainedConfig.__post_init__, PreTrainedConfig.convert_rope_params_to_dict):
        popped |= set(re.findall(r"kwargs\.(?:pop|get)\(\s*\"(\w+)\"", inspect.getsource(fn)))
    popped |= set(re.findall(r"^\s+\"(\w+)\",$", inspect.getsource(PreTrainedConfig.__post_init__), re.M))
    generation = set(GenerationConfig._get_default_generation_params())
    out = {}
    for cls in (MistralConfig, MixtralConfig, MinistralConfig):
        keys = {f.name for f in dataclasses.fields(cls)} | set(cls().to_dict()) | set(cls.attribute_map) | popped
        out[cls.model_type] = keys - generation
    return out


def test_key_tables_cover_every_key_transformers_reads():
    keys = transformers_keys()
    assert {"hidden_act", "rope_scaling", "rope_theta", "layer_types", "num_experts", "torch_dtype"} <= set().union(
        *keys.values())  # the derivation itself finds what it must
    for model_type, names in keys.items():
        missing = sorted(names - set(HF_KEYS))
        assert not missing, f"{model_type}: transformers reads {missing}: implement or list them in mtx.config.HF_KEYS"


def test_key_tables_are_well_formed():
    for table in (HF_KEYS, ROPE_KEYS, PARAMS_KEYS, MOE_KEYS):
        for key, spec in table.items():
            assert spec.status in (IMPLEMENTED, IRRELEVANT, REFUSED), key
            assert spec.note and "\n" not in spec.note, key
            if spec.status == REFUSED:
                assert spec.accepts is not None, f"{key}: a refused key needs its neutral value"


def test_defaults_follow_transformers_for_each_family(tmp_path):
    """Absent keys mean what they mean to transformers: Mixtral's rope_theta 1e6 and eps 1e-5."""
    from transformers import MinistralConfig, MistralConfig, MixtralConfig

    for cls in (MistralConfig, MixtralConfig, MinistralConfig):
        (tmp_path / "config.json").write_text(json.dumps({**BASE, "model_type": cls.model_type}))
        cfg = load_config(tmp_path)
        hf = cls(**{k: v for k, v in BASE.items() if k != "model_type"})
        assert cfg.rope_theta == hf.rope_parameters["rope_theta"], cls.model_type
        assert cfg.rms_norm_eps == hf.rms_norm_eps, cls.model_type
        assert cfg.sliding_window == hf.sliding_window, cls.model_type
        assert cfg.max_position_embeddings == hf.max_position_embeddings, cls.model_type


def test_num_key_value_heads_absent_or_null_as_transformers(tmp_path):
    """Absent: the config classes' default of 8 KV heads (transformers 5); null: as many as query heads
    (transformers 4, whose classes mapped None to num_attention_heads). Found by review: mtx read an
    absent key as num_attention_heads."""
    from transformers import MinistralConfig, MistralConfig, MixtralConfig

    data = {k: v for k, v in {**BASE, "num_attention_heads": 16, "hidden_size": 256}.items()
            if k != "num_key_value_heads"}
    for cls in (MistralConfig, MixtralConfig, MinistralConfig):
        (tmp_path / "config.json").write_text(json.dumps({**data, "model_type": cls.model_type}))
        hf = cls(**{k: v for k, v in data.items() if k != "model_type"})
        assert load_config(tmp_path).num_kv_heads == hf.num_key_value_heads == 8, cls.model_type
    (tmp_path / "config.json").write_text(json.dumps({**data, "num_key_value_heads": None}))
    assert load_config(tmp_path).num_kv_heads == 16


@pytest.mark.parametrize("extra", [
    {"rope_theta": 5.0, "rope_parameters": {"rope_type": "default", "rope_theta": 7.0}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "rope_scaling": {"type": "default"}},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "rope_scaling": {"rope_type": "default"},
     "rope_theta": 9.0},
    {"rope_parameters": {"rope_type": "default", "rope_theta": 7.0}, "rope_scaling": None},
    {"rope_parameters": None, "rope_theta": 9.0},
    {"rope_scaling": {"type": "default", "rope_theta": 3.0}},
], ids=["object-beats-top-level", "rope_scaling-replaces", "rope_scaling-top-level", "null-rope_scaling",
        "null-rope_parameters", "rope_scaling-only"])
def test_rope_theta_is_read_as_transformers_reads_it(tmp_path, extra):
    from transformers import MistralConfig

    data = {**BASE, **extra}
    (tmp_path / "config.json").write_text(json.dumps(data))
    hf = MistralConfig.from_dict({k: v for k, v in data.items() if k != "model_type"})
    assert load_config(tmp_path).rope_theta == hf.rope_parameters["rope_theta"]


# --------------------------------------------------------------------------------------------------
# Implemented keys at non-default values: the reference equals transformers


def _edit(src: Path, dst: Path, drop: tuple[str, ...] = (), **changes) -> Path:
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    for k in drop:
        cfg.pop(k, None)
    cfg.update(changes)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


MINISTRAL = {"model_type": "ministral", "architectures": ["MinistralForCausalLM"]}

#: name -> (base variant, keys dropped, keys set, whether transformers' logits change from the base's)
IMPLEMENTED_CASES = {
    "rms_norm_eps": ("mistral", (), {"rms_norm_eps": 0.5}, True),
    "rope_object_beats_top_level": ("mistral", (), {"rope_theta": 10.0,
                                                    "rope_parameters": {"rope_type": "default", "rope_theta": 100.0}},
                                    True),
    "rope_scaling_replaces_rope_parameters": ("mistral", (), {"rope_theta": 100.0,
                                                              "rope_scaling": {"type": "default"}}, True),
    "mixtral_defaults": ("mixtral4", ("rope_parameters", "rope_theta", "rms_norm_eps"), {}, True),
    "num_experts_alias": ("mixtral4", (), {"num_experts": 4, "num_local_experts": 8}, False),
    "num_experts_per_tok": ("mixtral4", (), {"num_experts_per_tok": 3}, True),
    "hidden_act_swish": ("mistral", (), {"hidden_act": "swish"}, False),
    "rope_scaling_linear_beside_rope_parameters": ("mistral", (), {"rope_scaling": {"type": "linear", "factor": 4.0}},
                                                   True),
    "rope_parameters_linear": ("mistral", (), {"rope_parameters": {"rope_type": "linear", "factor": 2.5,
                                                                   "rope_theta": 500.0}}, True),
    "ministral_sliding": ("mistral", (), {**MINISTRAL, "layer_types": ["sliding_attention"] * 2}, False),
    "ministral_full": ("mistral", (), {**MINISTRAL, "layer_types": ["full_attention"] * 2}, True),
    "ministral_legacy_attention": ("mistral", (), {**MINISTRAL, "layer_types": ["attention"] * 2}, True),
    # per-layer windows: each layer's own mask (a reader that gave every layer one window fails here)
    "ministral_full_then_sliding": ("mistral", (), {**MINISTRAL, "layer_types": ["full_attention",
                                                                                 "sliding_attention"]}, True),
    "ministral_sliding_then_full": ("mistral", (), {**MINISTRAL, "layer_types": ["sliding_attention",
                                                                                 "full_attention"]}, True),
}


@pytest.mark.parametrize("name", list(IMPLEMENTED_CASES))
def test_implemented_key_matches_transformers(ckpt_factory, tmp_path, name):
    variant, drop, changes, changes_logits = IMPLEMENTED_CASES[name]
    base = ckpt_factory(variant)
    folder = _edit(base, tmp_path / name, drop, **changes)
    ids = torch.randint(0, 128, (2, SEQ), generator=torch.Generator().manual_seed(11))
    ref = hf_logits(folder, ids)
    if changes_logits:  # the key matters to transformers, so a reader that ignored it would fail here
        assert (ref - hf_logits(base, ids)).abs().max().item() > 1e-3
    model = build_model(folder, "float32")
    got = run_chunked(model, ids, 7, None if model.cfg.sliding_window else 64)
    err = (got - ref).abs().max().item()
    assert err <= ATOL, f"{name}: max abs diff {err:.3e}"


# --------------------------------------------------------------------------------------------------
# Refused keys: one line naming the key and the file


HF_REFUSED = [
    ({"hidden_act": "gelu"}, "'hidden_act' = 'gelu'"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "'hidden_act' = 'gelu_pytorch_tanh'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
      "rope_scaling": {"type": "linear"}}, "'rope_scaling.factor' is required with rope_type 'linear'"),
    ({"rope_scaling": {"type": "linear", "factor": 0}}, "'rope_scaling.factor' must be a positive number"),
    ({"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, "'rope_scaling.rope_type' = 'dynamic'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0}}, "'rope_parameters.rope_type' = 'llama3'"),
    ({"rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5}},
     "'rope_parameters.partial_rotary_factor' = 0.5"),
    ({"partial_rotary_factor": 0.5}, "'partial_rotary_factor' = 0.5"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default"}}}, "'rope_parameters.full_attention'"),
    ({"attention_bias": True}, "'attention_bias' = true"),
    ({"mlp_bias": True}, "'mlp_bias' = true"),
    ({"use_sliding_window": False, "sliding_window": 16}, "'use_sliding_window' = false"),
    ({"max_window_layers": 1, "sliding_window": 16}, "'max_window_layers' = 1"),
    ({"quantization_config": {"quant_method": "fp8"}}, "'quantization_config'"),
    ({"is_encoder_decoder": True}, "'is_encoder_decoder' = true"),
    ({"per_layer_config": {"0": {"sliding_window": 4}}}, "'per_layer_config'"),
    ({"layer_types": ["sliding_attention", "full_attention"], "sliding_window": 16},
     "'layer_types' = [\"sliding_attention\", \"full_attention\"] is not supported"),  # Mistral ignores it
    ({"model_type": "ministral", "layer_types": ["sliding_attention", "full_attention"], "sliding_window": None},
     "'layer_types' has sliding_attention layers but sliding_window is null"),
    ({"model_type": "ministral", "layer_types": ["sliding_attention", "global"]}, "'layer_types' = "),
    ({"model_type": "ministral", "layer_types": ["sliding_attention"]}, "'layer_types' has 1 entries for 2 layers"),
    ({"layer_types": ["full_attention", "full_attention"], "sliding_window": 16},
     "'layer_types' (full_attention) disagrees with sliding_window (16)"),
]
HF_REFUSED += [
    ({"rope_scaling": {"rope_type": None, "type": "linear", "factor": 2.0}}, "'rope_scaling.rope_type' is null"),
    ({"model_type": "ministral", "layer_types": ["sliding_attention"] * 3, "sliding_window": 16},
     "'layer_types' has 3 entries"),
]
PARAMS_REFUSED = [
    ({"lora": {"enable": True, "rank": 16, "scaling": 2.0}}, "'lora'"),
    ({"quantization": {"qformat_weight": "fp8_e4m3"}}, "'quantization'"),
    ({"vision_encoder": {"hidden_size": 1024}}, "'vision_encoder'"),
    ({"yarn": {"factor": 4.0}}, "'yarn'"),
    ({"llama_4_scaling": {"beta": 0.1}}, "'llama_4_scaling'"),
    ({"sliding_window": [16, 16, 4096]}, "'sliding_window' has 3 entries, which does not divide n_layers 2"),
    ({"sliding_window": [16, 0]}, "'sliding_window' = [16, 0] is not supported"),
    ({"moe": {"num_experts": 8, "num_experts_per_tok": 2, "num_shared_experts": 1}}, "'moe.num_shared_experts'"),
]
REFUSED_CASES = ([("config.json", {**BASE, **c}, n) for c, n in HF_REFUSED]
                 + [("params.json", {**PARAMS, **c}, n) for c, n in PARAMS_REFUSED])


@pytest.mark.parametrize("name,data,needle", REFUSED_CASES, ids=[c[2][:48] for c in REFUSED_CASES])
def test_refused_key_is_one_line_naming_it(tmp_path, name, data, needle):
    (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    msg = str(e.value)
    assert needle in msg and str(tmp_path / name) in msg and "\n" not in msg, msg


@pytest.mark.parametrize("data", [
    {"hidden_act": "silu", "attention_dropout": 0.1, "router_jitter_noise": 0.5, "attention_bias": False,
     "use_sliding_window": True, "max_window_layers": 0, "partial_rotary_factor": 1.0, "quantization_config": None,
     "initializer_range": 0.5, "pad_token_id": 0, "use_cache": False, "some_key_transformers_ignores": [1, 2]},
    {"model_type": "ministral", "layer_types": ["sliding_attention", "sliding_attention"], "sliding_window": 16},
    {"use_sliding_window": False, "sliding_window": None, "max_window_layers": 28},
], ids=["neutral-and-irrelevant", "ministral-uniform", "qwen2-no-window"])
def test_neutral_values_are_accepted(tmp_path, data):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, **data}))
    cfg = load_config(tmp_path)
    assert cfg.model_type == "mistral" and cfg.sliding_window == data.get("sliding_window", 4096)


def test_params_uniform_window_list(tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({**PARAMS, "sliding_window": [16, 16], "lora": None,
                                                      "max_batch_size": 4}))
    cfg = load_config(tmp_path)
    assert cfg.sliding_window == 16 and cfg.layer_windows == () and cfg.windows == (16, 16)


@pytest.mark.parametrize("window,layers,want", [([None, 16], 2, (0, 16)), ([32, 8], 4, (32, 8, 32, 8)),
                                                ([None], 2, (0, 0))])
def test_params_window_list_per_layer(tmp_path, window, layers, want):
    """mistral-inference's list is one window per layer, repeated over the layers; null is full attention."""
    (tmp_path / "params.json").write_text(json.dumps({**PARAMS, "n_layers": layers, "sliding_window": window}))
    cfg = load_config(tmp_path)
    assert cfg.windows == want and cfg.sliding_window == (max(want) or None)
    assert cfg.layer_windows == (want if len(set(want)) > 1 else ())


def test_ministral_layer_types_give_each_layer_its_window(tmp_path):
    """As transformers' MinistralAttention: sliding_attention layers have sliding_window, full_attention none."""
    from transformers import MinistralConfig

    kinds = ["full_attention", "sliding_attention", "sliding_attention", "sliding_attention"]
    data = {**BASE, "model_type": "ministral", "num_hidden_layers": 4, "sliding_window": 16, "layer_types": kinds}
    (tmp_path / "config.json").write_text(json.dumps(data))
    cfg = load_config(tmp_path)
    hf = MinistralConfig(**{k: v for k, v in data.items() if k != "model_type"})
    assert cfg.windows == tuple(hf.sliding_window if t == "sliding_attention" else 0 for t in hf.layer_types)
    assert cfg.windows == (0, 16, 16, 16) and cfg.model_type == "mistral"
    assert mtx_config.ModelConfig.from_dict(cfg.to_dict()) == cfg and cfg.to_dict()["layer_windows"] == [0, 16, 16, 16]


def one_line(res, *needles: str) -> str:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtx: ") and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


def test_gelu_is_refused_by_export_and_inspect(run_mtx, ckpt_factory, tmp_path):
    """The issue's silently wrong gelu export (max |d| 0.77 against transformers) stops before any work."""
    folder = _edit(ckpt_factory("mistral"), tmp_path / "ckpt", hidden_act="gelu")
    needle = "'hidden_act' = 'gelu' is not supported"
    one_line(run_mtx("export", folder, "-o", tmp_path / "out"), needle, str(folder / "config.json"))
    assert not (tmp_path / "out").exists()
    one_line(run_mtx("inspect", folder), needle, str(folder / "config.json"))


@pytest.mark.parametrize("target", ["onnxruntime", "onnx", "tensorrt"])
def test_linear_rope_scaling_in_every_target(ckpt_factory, tmp_path, target):
    """The issue's other case (rope_scaling linear x4 beside rope_parameters: max |d| 4.3) is implemented
    through inv_freq, the one RoPE input of every target (ONNX Runtime's cos/sin tables, the mtx
    function bodies run here by ONNX Runtime, the TensorRT plugins): each export equals transformers."""
    from mtx.exporter.core import export
    from mtx.exporter.options import ExportOptions
    from mtx.manifest import read_manifest
    from test_export_parity import exported_logits, token_ids

    base = ckpt_factory("mistral")
    folder = _edit(base, tmp_path / "ckpt", rope_scaling={"type": "linear", "factor": 4.0})
    assert "rope_parameters" in json.loads((folder / "config.json").read_text())
    out = tmp_path / "out"
    export(folder, out, ExportOptions(target=target))
    assert read_manifest(out).config["rope_linear_factor"] == 4.0
    ids = token_ids()
    ref = hf_logits(folder, ids).numpy()
    assert abs(ref - hf_logits(base, ids).numpy()).max() > 1e-2  # the factor matters
    err = abs(exported_logits(out, ids) - ref).max()
    assert err <= ATOL, f"{target}: max abs diff {err:.3e}"


def test_refused_params_key_from_the_cli(run_mtx, tmp_path):
    (tmp_path / "params.json").write_text(json.dumps({**PARAMS, "lora": {"enable": True, "rank": 8}}))
    one_line(run_mtx("inspect", tmp_path), "'lora'", "LoRA", str(tmp_path / "params.json"))


# --------------------------------------------------------------------------------------------------
# Tokenizer files: inspect checks them; a Rust panic stays off stderr


def test_inspect_checks_tokenizer_files(run_mtx, ckpt_factory, tmp_path):
    folder = _edit(ckpt_factory("mistral"), tmp_path / "ckpt")
    (folder / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "Nonsense"}}')
    one_line(run_mtx("inspect", folder), str(folder / "tokenizer.json"), "not a tokenizer")
    (folder / "tokenizer.json").unlink()
    (folder / "generation_config.json").write_text('{"eos_token_id": "x"}')
    one_line(run_mtx("inspect", folder), str(folder / "generation_config.json"), "'eos_token_id'")


def test_tokenizer_panic_leaves_one_line_on_stderr(run_mtx, ckpt_factory, tmp_path):
    """A pre-tokenizer regex that backtracks catastrophically makes Oniguruma give up and tokenizers
    panic: Rust prints "thread '<unnamed>' panicked at ..." (and a backtrace) on stderr before Python
    sees the exception. mtx's one line must be all there is."""
    folder = _edit(ckpt_factory("mistral"), tmp_path / "ckpt")
    tok = json.loads((folder / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(a+)+$"}, "behavior": "Removed", "invert": False}
    (folder / "tokenizer.json").write_text(json.dumps(tok))
    out = tmp_path / "out"
    res = run_mtx("export", folder, "-o", out, "--target", "onnx")
    assert res.returncode == 0, res.stderr
    res = run_mtx("generate", out, "--prompt", "a" * 40 + "b", "--max-new-tokens", "2",
                  env={"RUST_BACKTRACE": "1"})
    line = one_line(res, "tokenizer", "retry-limit-in-match over")
    assert res.stderr == line + "\n", res.stderr
    res = run_mtx("generate", out, "--prompt", "w3 w4", "--max-new-tokens", "2")  # a harmless text still runs
    assert res.returncode == 0, res.stderr


def test_panic_filter_keeps_other_stderr(capfd):
    """What else reaches fd 2 during a held call is written through; only the panic report is dropped."""
    import os

    from mtx.tokenizer import _rust_stderr_held

    with _rust_stderr_held():
        os.write(2, b"a warning\n")
    with pytest.raises(RuntimeError):
        with _rust_stderr_held():
            os.write(2, b"kept\n\nthread '<unnamed>' (7) panicked at src/lib.rs:1:2:\nboom\nstack backtrace:\n")
            raise RuntimeError
    assert capfd.readouterr().err == "a warning\nkept\n"
    assert mtx_config.HF_KEYS["hidden_act"].accepts("silu", {})

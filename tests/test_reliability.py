"""Reliability: no silently wrong model, integrity at load, clean errors for bad input, safe output life cycle.

Each case is an input a hostile user (or a broken disk) can give. The promise: one line naming the
file, tensor or option (exit 2; exit 1 for an environment fault), no traceback, nothing lost, and a
model that loads is the model that was exported. Expected messages name the key or file; the
reference for "loaded the right model" is the untouched export's own logits.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import mtx
from broken_exports import BROKEN, make_broken, store_symlinks
from conftest import mtx_command, mtx_env
from mtx.config import load_config
from mtx.errors import CheckpointError, ConfigError, MtxError, ResourceError, UsageError
from mtx.exporter import output
from mtx.exporter.core import export
from mtx.exporter.options import ExportOptions
from mtx.manifest import ManifestError, read_manifest
from mtx.models.checkpoint import Checkpoint
from mtx.runtime.ort_backend import OrtModelError, ort_error

BASE = {"model_type": "mistral", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}
PARAMS = {"dim": 64, "n_layers": 2, "head_dim": 16, "hidden_dim": 128, "n_heads": 4, "n_kv_heads": 2,
          "norm_eps": 1e-5, "vocab_size": 100}


def one_line(res: subprocess.CompletedProcess, code: int, *needles: str) -> str:
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtx: ") and "Traceback" not in res.stderr, res.stderr
    for n in needles:
        assert n in lines[0], lines[0]
    return lines[0]


# --------------------------------------------------------------------------------------------------
# 1. Config types are checked, not coerced


CONFIG_CASES = [
    ("config.json", {**BASE, "tie_word_embeddings": "false"}, "'tie_word_embeddings' must be true or false"),
    ("config.json", {**BASE, "sliding_window": True}, "'sliding_window' must be a positive integer"),
    ("config.json", {**BASE, "num_hidden_layers": 1.9}, "'num_hidden_layers' must be a positive integer"),
    ("config.json", {**BASE, "num_key_value_heads": 0}, "'num_key_value_heads' must be a positive integer"),
    ("config.json", {**BASE, "model_type": "mixtral", "num_local_experts": 0}, "'num_local_experts'"),
    ("config.json", {**BASE, "hidden_size": True}, "'hidden_size' must be a positive integer"),
    ("config.json", {**BASE, "vocab_size": 100.0}, "'vocab_size' must be a positive integer"),
    ("config.json", {**BASE, "head_dim": 0}, "'head_dim' must be a positive integer"),
    ("config.json", {**BASE, "rms_norm_eps": "1e-6"}, "'rms_norm_eps' must be a positive number"),
    ("config.json", {**BASE, "rope_theta": True}, "'rope_theta' must be a positive number"),
    ("config.json", {**BASE, "eos_token_id": "abc"}, "'eos_token_id' must be a token id or a list"),
    ("config.json", {**BASE, "eos_token_id": 2.5}, "'eos_token_id' must be a token id or a list"),
    ("config.json", {**BASE, "eos_token_id": [2, "x"]}, "'eos_token_id' must be a token id or a list"),
    ("params.json", {**PARAMS, "rope_theta": 0}, "'rope_theta' must be a positive number"),
    ("params.json", {**PARAMS, "n_kv_heads": 0}, "'n_kv_heads' must be a positive integer"),
    ("params.json", {**PARAMS, "tied_embeddings": "false"}, "'tied_embeddings' must be true or false"),
    ("params.json", {**PARAMS, "moe": {"num_experts": 0, "num_experts_per_tok": 2}}, "'moe.num_experts'"),
]


@pytest.mark.parametrize("name,data,needle", CONFIG_CASES, ids=[c[2][:40] for c in CONFIG_CASES])
def test_config_types_are_checked(tmp_path, name, data, needle):
    (tmp_path / name).write_text(json.dumps(data))
    with pytest.raises(ConfigError) as e:
        load_config(tmp_path)
    assert needle in str(e.value) and str(tmp_path / name) in str(e.value)


@pytest.mark.parametrize("raw,needle", [(b'{"model_type": "mistral\xff"}', "not UTF-8"),
                                        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
                                        (b"[1, 2]", "expected a JSON object")])
def test_config_file_encoding(tmp_path, raw, needle):
    (tmp_path / "config.json").write_bytes(raw)
    with pytest.raises(ConfigError, match=needle):
        load_config(tmp_path)


def test_config_error_from_the_cli_is_one_line(run_mtx, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "tie_word_embeddings": "false"}))
    one_line(run_mtx("inspect", tmp_path), 2, "tie_word_embeddings", str(tmp_path / "config.json"))


# --------------------------------------------------------------------------------------------------
# 1. The config and the tensors agree


@pytest.fixture
def ckpt(ckpt_factory, tmp_path):
    dst = tmp_path / "ckpt"
    shutil.copytree(ckpt_factory("mistral"), dst)
    return dst


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_config_with_fewer_layers_than_the_checkpoint(ckpt):
    edit_json(ckpt / "config.json", num_hidden_layers=1)
    with pytest.raises(CheckpointError, match=r"tensor 'model\.layers\.1\..*' \(and \d+ more\) is not used"):
        Checkpoint(ckpt)


def test_stray_copy_of_a_tensor_in_an_unindexed_folder(ckpt):
    tensors = load_file(str(ckpt / "model.safetensors"))
    save_file({"model.norm.weight": torch.zeros_like(tensors["model.norm.weight"])}, str(ckpt / "stray.safetensors"))
    with pytest.raises(CheckpointError) as e:
        Checkpoint(ckpt)
    assert "'model.norm.weight' is also stored in" in str(e.value)
    assert "stray.safetensors" in str(e.value) and "model.safetensors" in str(e.value)


@pytest.fixture
def sharded(ckpt_factory, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(ckpt_factory("sharded"), dst)
    return dst


def test_tensor_in_two_shards(sharded):
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    name, shard = next(iter(index["weight_map"].items()))
    other = next(f for f in sorted(set(index["weight_map"].values())) if f != shard)
    extra = load_file(str(sharded / other))
    extra[name] = load_file(str(sharded / shard))[name]
    save_file(extra, str(sharded / other))
    with pytest.raises(CheckpointError, match="is also stored in"):
        Checkpoint(sharded)


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd"])
def test_index_entries_outside_the_folder(sharded, target):
    index_path = sharded / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"][next(iter(index["weight_map"]))] = target
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside the checkpoint folder"):
        Checkpoint(sharded)


@pytest.mark.parametrize("weight_map", [["a.safetensors"], {"model.norm.weight": 3}])
def test_malformed_weight_map(sharded, weight_map):
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="'weight_map' of tensor name -> file name"):
        Checkpoint(sharded)


def test_index_not_utf8(sharded):
    (sharded / "model.safetensors.index.json").write_bytes(b'{"weight_map": "\xfe"}')
    with pytest.raises(CheckpointError, match="not UTF-8"):
        Checkpoint(sharded)


def test_symlinked_shards_stay_allowed(sharded, tmp_path):
    """The Hugging Face cache keeps files as symlinks into a blobs folder: that must load."""
    blobs = tmp_path / "blobs"
    blobs.mkdir()
    for f in sharded.glob("*.safetensors"):
        shutil.move(f, blobs / f.name)
        f.symlink_to(blobs / f.name)
    ck = Checkpoint(sharded)
    assert torch.equal(ck.load("norm.weight"), Checkpoint(sharded).load("norm.weight"))


def test_unreadable_file_gives_the_real_cause(ckpt):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError, match=r"model\.safetensors: cannot read \((?!None\)).+\)"):
        Checkpoint(ckpt)


def poison(ckpt: Path, key: str, value: float) -> None:
    tensors = load_file(str(ckpt / "model.safetensors"))
    tensors[key][0, 0] = value
    save_file(tensors, str(ckpt / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("target,dtype", [("onnxruntime", "float32"), ("onnx", "float16")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nonfinite_weights_are_refused(ckpt, tmp_path, target, dtype, value):
    """Referenced bytes (float32 onnxruntime) and converted tensors (float16) are both checked."""
    poison(ckpt, "model.layers.1.mlp.up_proj.weight", value)
    out = tmp_path / "out"
    with pytest.raises(CheckpointError, match=r"'model\.layers\.1\.mlp\.up_proj\.weight'.*NaN or Inf"):
        export(ckpt, out, ExportOptions(target=target, dtype=dtype))
    assert not out.exists() and not list(tmp_path.glob(".out.*"))
    export(ckpt, out, ExportOptions(target=target, dtype=dtype, allow_nonfinite=True))
    assert read_manifest(out).target == target


def test_nonfinite_from_the_cli(run_mtx, ckpt, tmp_path):
    poison(ckpt, "model.embed_tokens.weight", float("nan"))
    one_line(run_mtx("export", ckpt, "-o", tmp_path / "o"), 2, "model.embed_tokens.weight", "--allow-nonfinite")


GENERATION_CASES = [(b"[1, 2]", "expected a JSON object"), (b'{"eos_token_id": ["x"]}', "'eos_token_id'"),
                    (b'{"eos_token_id": 2.5}', "'eos_token_id'"), (b'{"eos_token_id": "\xff"}', "not UTF-8")]


@pytest.mark.parametrize("raw,needle", GENERATION_CASES)
def test_malformed_generation_config_is_refused_at_export(ckpt, tmp_path, raw, needle):
    (ckpt / "generation_config.json").write_bytes(raw)
    with pytest.raises(MtxError, match=needle) as e:
        export(ckpt, tmp_path / "out", ExportOptions(target="onnx"))
    assert "generation_config.json" in str(e.value) and not (tmp_path / "out").exists()


def test_tokenizer_that_fails_to_load_is_one_line(ckpt, tmp_path):
    tok = json.loads((ckpt / "tokenizer.json").read_text())
    tok["pre_tokenizer"] = {"type": "Split", "pattern": {"Regex": "(unclosed"}, "behavior": "Isolated",
                            "invert": False}
    (ckpt / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(CheckpointError, match="tokenizer.json: not a tokenizer"):
        export(ckpt, tmp_path / "out", ExportOptions(target="onnx"))


def test_tokenizer_model_symlink_outside_is_said(ckpt, tmp_path):
    outside = tmp_path / "elsewhere.model"
    outside.write_bytes(b"sentencepiece bytes")
    (ckpt / "tokenizer.model").symlink_to(outside)
    result = export(ckpt, tmp_path / "out", ExportOptions(target="onnx"))
    assert any(f"copied from {outside.resolve()}" in n for n in result.notes)
    assert not (result.out / "tokenizer.model").is_symlink()
    assert (result.out / "tokenizer.model").read_bytes() == b"sentencepiece bytes"


# --------------------------------------------------------------------------------------------------
# 2. Integrity at load


@pytest.fixture(scope="module")
def good_export(ckpt_factory, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("good") / "out"
    export(ckpt_factory("mistral"), out, ExportOptions(target="onnxruntime"))
    return out


@pytest.fixture
def copy_of(good_export, tmp_path):
    dst = tmp_path / "export"
    shutil.copytree(good_export, dst)
    return dst


def reference_ids(folder: Path) -> list[int]:
    return mtx.load(folder, verify=False).generate([[5, 6, 7]], max_new_tokens=6, stop_token_ids=[])[0]


def test_flipped_weights_are_refused_at_load(copy_of, good_export):
    data = next(f for f in read_manifest(copy_of).files if f.role in ("weights", "checkpoint-weights"))
    path = copy_of / data.path
    raw = bytearray(path.read_bytes())
    raw[-8192:-4096] = bytes(b ^ 0xFF for b in raw[-8192:-4096])
    path.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="sha256 differs"):
        mtx.load(copy_of)
    assert reference_ids(copy_of) != reference_ids(good_export)  # what verification protects against


def test_swapped_graph_is_refused(copy_of):
    path = copy_of / "model.onnx"
    raw = bytearray(path.read_bytes())
    i = raw.find(b"mtx export of")
    raw[i:i + 3] = b"MTX"  # same size, a different graph file
    path.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="model.onnx: sha256 differs"):
        mtx.load(copy_of)


def test_weights_are_hashed_once_per_file_state(copy_of, monkeypatch, tmp_path):
    from mtx import integrity

    monkeypatch.setenv("MTX_CACHE_DIR", str(tmp_path / "cache"))
    hashed: list[str] = []
    real = integrity.sha256_file
    monkeypatch.setattr(integrity, "sha256_file", lambda p, *a: hashed.append(Path(p).name) or real(p, *a))
    mtx.load(copy_of)
    big = {f.path for f in read_manifest(copy_of).files if f.role in integrity.LARGE_ROLES}
    assert big and big <= set(hashed)
    hashed.clear()
    mtx.load(copy_of)
    assert "model.onnx" in hashed and not big & set(hashed)  # small files always, weights not again
    name = next(iter(big))
    (copy_of / name).write_bytes((copy_of / name).read_bytes())  # same bytes, new file state
    hashed.clear()
    mtx.load(copy_of)
    assert name in hashed


def tamper(folder: Path, edit) -> None:
    path = folder / "mtx.json"
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


#: Manifests whose values contradict the graph, refused by the runtime's checks at load. What the
#: readers themselves refuse (keys, types, values, config, files) is tests/test_manifest.py's table,
#: run against the Python and the C++ reader.
def every_layer(**values) -> Callable[[dict], None]:
    """Set ``values`` at the top level and in every ``layers`` entry (a manifest consistent in itself)."""
    return lambda d: (d.update(values), [x.update(values) for x in d["layers"]])


TAMPER_CASES = {
    "capacity 0": (every_layer(capacity=0), "capacity 0"),
    "capacity -1": (every_layer(capacity=-1), "capacity -1"),
    "capacity 16": (every_layer(capacity=16), "capacity 16"),
    "capacity 64": (every_layer(capacity=64), "capacity 64"),
    "vocab 4096": (lambda d: d["config"].update(vocab_size=4096), "vocab_size 4096"),
    "max_position 100000": (lambda d: d.update(max_position=100000), "max_position 100000"),
    "ops": (lambda d: d["ops"].update({"ai.onnx::Add": 1}), "ops do not match"),
    "dtype": (lambda d: d.update(dtype="float16"), "dtype float16 but the graph's past_key.0 is float32"),
    "local_window_size": (every_layer(local_window_size=4), "local_window_size 4 but the graph's node"),
    "layer_outputs": (lambda d: d["layer_outputs"][1].update(after_attention="x"), "layer_outputs names 'x'"),
}


@pytest.mark.parametrize("case", list(TAMPER_CASES))
def test_tampered_manifest_is_one_line(copy_of, case):
    edit, needle = TAMPER_CASES[case]
    tamper(copy_of, edit)
    with pytest.raises(ManifestError, match=re.escape(needle)):
        mtx.load(copy_of, verify=False)


def test_tampered_manifest_from_the_cli(run_mtx, copy_of):
    tamper(copy_of, every_layer(capacity=64))
    one_line(run_mtx("generate", copy_of, "--ids", "1,2", "--max-new-tokens", "1"), 2, "capacity 64")


def same_size(path: Path, raw: bytes) -> None:
    """Overwrite ``path`` with ``raw`` padded by spaces to the file's size (the size check passes)."""
    size = path.stat().st_size
    path.write_bytes(raw + b" " * (size - len(raw)))


def test_corrupt_graph_without_verification(copy_of):
    same_size(copy_of / "model.onnx", b"\x08\x07garbage")
    with pytest.raises(ManifestError, match="not a readable ONNX model"):
        mtx.load(copy_of, verify=False)


@pytest.mark.parametrize("name,raw,needle", [("tokenizer.json", b"{not json", "tokenizer.json: not a tokenizer"),
                                             ("generation_config.json", b"[1]", "generation_config.json")])
def test_bad_side_files_at_load(copy_of, name, raw, needle):
    same_size(copy_of / name, raw)
    with pytest.raises(MtxError, match=needle):
        mtx.load(copy_of, verify=False)
    with pytest.raises(ManifestError, match="sha256 differs"):  # and by default the hash says it changed
        mtx.load(copy_of)


# --------------------------------------------------------------------------------------------------
# 3. Run-time options


@pytest.fixture(scope="module")
def generator(good_export):
    return mtx.load(good_export)


@pytest.mark.parametrize("kwargs,needle", [
    (dict(temperature=float("nan")), "temperature must be a finite number"),
    (dict(temperature=float("inf")), "temperature must be a finite number"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty must be a finite number"),
    (dict(top_p=float("nan")), "top_p must be a finite number"),
    (dict(seed=-1, temperature=1.0), r"seed must be an integer in \[0, 2\*\*63\)"),
    (dict(seed=1 << 63, temperature=1.0), r"seed must be an integer in \[0, 2\*\*63\)"),
    (dict(top_k=1.5), "top_k must be an integer"),
    (dict(max_new_tokens=2.5), "max_new_tokens must be an integer"),
])
def test_bad_generation_options(generator, kwargs, needle):
    kw = {"max_new_tokens": 2, **kwargs}
    with pytest.raises(UsageError, match=needle):
        generator.generate([[1, 2, 3]], **kw)
    with pytest.raises(UsageError, match=needle):
        s = generator.session()
        s.append([1, 2, 3])
        s.generate(**kw)


@pytest.mark.parametrize("prompts,needle", [([["a"]], "expected text or a list of token ids, got list holding str"),
                                            (None, "prompts must be a list"),
                                            ([[1, True]], "expected text or a list of token ids"),
                                            (["ok \udcff"], "not valid UTF-8")])
def test_bad_prompts_raise_the_package_error(generator, prompts, needle):
    with pytest.raises(UsageError, match=needle):
        generator.generate(prompts, max_new_tokens=1)


@pytest.mark.parametrize("kwargs,needle", [(dict(threads=100000), "threads must be an integer from 1 to"),
                                           (dict(threads=0), "threads must be"),
                                           (dict(device="tpu"), "device: expected cpu, cuda or cuda:N"),
                                           (dict(backend="tflite"), "unknown backend 'tflite'")])
def test_bad_engine_options(good_export, kwargs, needle):
    with pytest.raises(UsageError, match=needle):
        mtx.load(good_export, **kwargs)


@pytest.mark.parametrize("args,needle", [
    (["generate", "--ids", "1,2", "--threads", "100000"], "--threads must be an integer from 1 to"),
    (["generate", "--ids", "1,2", "--temperature", "nan"], "--temperature must be a finite number"),
    (["generate", "--ids", "1,2", "--repetition-penalty", "nan"], "--repetition-penalty must be a finite"),
    (["generate", "--ids", "1,2", "--seed", "-1", "--temperature", "1"], "--seed must be an integer in [0, 2**63)"),
    (["generate", "--ids", "1,2", "--device", "tpu"], "--device: expected cpu, cuda or cuda:N"),
    (["bench", "--batch", "0", "--new-tokens", "2", "--prompt-len", "2"], "--batch must be >= 1"),
])
def test_bad_run_options_from_the_cli(run_mtx, good_export, args, needle):
    one_line(run_mtx(args[0], good_export, *args[1:]), 2, needle)


def test_invalid_utf8_prompt_from_the_shell(run_mtx, good_export):
    res = run_mtx("generate", good_export, "--prompt", b"x = \xff\xfe", "--max-new-tokens", "1", timeout=300)
    one_line(res, 2, "--prompt", "not valid UTF-8")


# --------------------------------------------------------------------------------------------------
# 4. ONNX Runtime's errors, and the manifest against the graph (tests/broken_exports.py; the same
# cases run against the C++ runtime in tests/test_cpp.py)


@pytest.fixture(scope="module")
def other_target_export(ckpt_factory, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("other") / "out"
    export(ckpt_factory("mistral"), out, ExportOptions(target="onnx"))
    return out


@pytest.mark.parametrize("case", list(BROKEN))
def test_broken_export_is_one_line_at_load(good_export, other_target_export, tmp_path, case):
    """Refused by mtx.load, hashes verified or not, before any request could reach the graph."""
    needle = make_broken(case, good_export, tmp_path / "broken", other_target_export)
    for verify in (True, False):
        with pytest.raises(MtxError) as e:
            mtx.load(tmp_path / "broken", verify=verify)
        assert needle in str(e.value) and "\n" not in str(e.value) and e.value.exit_code == 2, str(e.value)
        assert str(tmp_path / "broken") in str(e.value)


@pytest.mark.parametrize("case", ["truncated model.onnx.data", "external data at ../", "unknown op domain",
                                  "manifest dtype float16", "graph fails at run", "graph fails at load",
                                  "mtx.json nested 200000 deep"])
def test_broken_export_from_the_cli(run_mtx, good_export, other_target_export, tmp_path, case):
    needle = make_broken(case, good_export, tmp_path / "broken", other_target_export)
    one_line(run_mtx("generate", tmp_path / "broken", "--ids", "1,2", "--max-new-tokens", "1"), 2, needle)


@pytest.mark.parametrize("case", ["manifest dtype float16", "graph fails at run"])
def test_server_that_cannot_run_its_model_never_serves(run_mtx, good_export, other_target_export, tmp_path, case):
    """Before: `mtx serve` started and answered every request with 500. Now the load (with its
    one-token warm-up) refuses the export: one line, exit 2, nothing listening."""
    import socket

    needle = make_broken(case, good_export, tmp_path / "broken", other_target_export)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    res = run_mtx("serve", tmp_path / "broken", "--port", port, timeout=300)
    one_line(res, 2, needle)


def test_symlinked_weights_in_a_store_load(good_export, tmp_path):
    """A deduplicated model store: the weight files are symlinks out of the folder. ONNX Runtime refuses
    external data outside the folder; mtx opens the graph with the locations resolved, and the sha256
    in mtx.json still pins the bytes."""
    store_symlinks(good_export, tmp_path / "linked", tmp_path / "store")
    assert (tmp_path / "linked" / "model.onnx.data").is_symlink()
    assert reference_ids(tmp_path / "linked") == reference_ids(good_export)
    mtx.load(tmp_path / "linked")  # verified
    blob = (tmp_path / "linked" / "model.onnx.data").resolve()
    raw = bytearray(blob.read_bytes())
    raw[-16:] = bytes(16)
    blob.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="model.onnx.data: sha256 differs"):
        mtx.load(tmp_path / "linked")


@pytest.mark.parametrize("message,kind,code", [
    ("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer", ResourceError, 1),
    ("std::bad_alloc", ResourceError, 1),
    ("[ONNXRuntimeError] : 1 : FAIL : Load model failed:Fatal error: x:Y(-1) is not a registered function/op",
     OrtModelError, 2),
])
def test_ort_errors_are_classified(tmp_path, message, kind, code):
    err = ort_error(tmp_path / "model.onnx", RuntimeError(message + "\nsecond line"), "run")
    assert type(err) is kind and err.exit_code == code
    assert str(err).startswith(f"{tmp_path / 'model.onnx'}: ONNX Runtime failed to run it") and "\n" not in str(err)
    assert "[ONNXRuntimeError]" not in str(err)


FAILING_RUN = textwrap.dedent("""
    import runpy, sys
    import onnxruntime
    real, message = onnxruntime.InferenceSession.run_with_iobinding, sys.argv[2]
    def fail(self, *a, **k):
        if getattr(fail, "armed", False):
            raise RuntimeError(message)
        fail.armed = True  # the warm-up at load runs; the first call of the generation fails
        return real(self, *a, **k)
    onnxruntime.InferenceSession.run_with_iobinding = fail
    sys.argv = ["mtx", "generate", sys.argv[1], "--ids", "1,2", "--max-new-tokens", "1"]
    runpy.run_module("mtx", run_name="__main__")
""")


@pytest.mark.parametrize("message,code,needle", [
    ("Failed to allocate memory for requested buffer of size 123", 1, "out of memory"),
    ("Non-zero status code returned while running Foo node", 2, "failed to run it (Non-zero status"),
])
def test_run_failure_from_the_cli(good_export, message, code, needle):
    """A call that fails after the load: one line naming the graph, out of memory exits 1, a graph
    that does not run exits 2."""
    res = subprocess.run([sys.executable, "-c", FAILING_RUN, str(good_export), message], capture_output=True,
                         text=True, env=mtx_env(), timeout=300)
    assert res.returncode == code, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("mtx: error: ") and needle in lines[0] and "model.onnx" in lines[0], res.stderr


def test_deep_json_in_the_verified_record_is_ignored(copy_of, monkeypatch, tmp_path):
    """$MTX_CACHE_DIR/verified.json is a best-effort record: a deeply nested one is rehashed past, not a crash."""
    monkeypatch.setenv("MTX_CACHE_DIR", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "verified.json").write_text("[" * 200000 + "]" * 200000)
    mtx.load(copy_of)


# --------------------------------------------------------------------------------------------------
# 4. Sessions


def test_abandoned_stream_does_not_deadlock_its_session(generator):
    s = generator.session()
    s.append([1, 2, 3])
    it = s.stream(10)
    first = next(it)
    done = threading.Event()

    def other_thread() -> None:
        s.append([4])
        done.set()

    threading.Thread(target=other_thread, daemon=True).start()
    assert done.wait(30), "append blocked behind a paused stream"
    s.append([5])  # the same thread, too
    with pytest.raises(UsageError, match="changed while the stream was paused"):
        next(it)
    # the session itself is intact: its tokens are what a fresh session given the same turns holds
    ref = generator.session()
    ref.append([1, 2, 3, first, 4, 5])
    assert s.tokens == ref.tokens
    assert np.allclose(s.append([6]), ref.append([6]), atol=1e-5)


def test_torch_backend_runs_one_call_at_a_time(ckpt_factory):
    """Shared by 8 threads, the torch backend serialises its calls (oversubscribing torch's thread
    pool cost 0.3x throughput) and every thread gets the single-threaded tokens."""
    gen = mtx.load(ckpt_factory("mistral"), "torch")
    prompts = [[i + 1, i + 2, i + 3] for i in range(8)]
    alone = [gen.generate([p], max_new_tokens=5, stop_token_ids=[])[0] for p in prompts]
    active, peak, lock = [0], [0], threading.Lock()
    real = gen.backend.model.forward

    def counting(*a, **k):
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        try:
            time.sleep(0.002)
            return real(*a, **k)
        finally:
            with lock:
                active[0] -= 1

    gen.backend.model.forward = counting
    got: dict[int, list[int]] = {}
    threads = [threading.Thread(target=lambda i=i: got.__setitem__(
        i, gen.generate([prompts[i]], max_new_tokens=5, stop_token_ids=[])[0])) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [got[i] for i in range(8)] == alone and peak[0] == 1


# --------------------------------------------------------------------------------------------------
# 5. Output life cycle


def test_sigterm_during_export_cleans_up(ckpt, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(mtx_command("export", ckpt, "-o", out), stderr=subprocess.PIPE, text=True, env=mtx_env())
    deadline = time.time() + 120
    while not list(tmp_path.glob(".out.*.partial")) and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip() == "mtx: terminated (SIGTERM)"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_stale_partials_are_swept(ckpt, tmp_path):
    out = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.{dead.stdout.strip()}.abc.partial"
    live = tmp_path / f".out.{os.getpid()}.def.partial"
    for p in (stale, live):
        p.mkdir()
        (p / "model.onnx.data").write_bytes(b"x" * 1000)
    export(ckpt, out, ExportOptions(target="onnx"))
    assert not stale.exists() and live.exists()


KILL_AFTER_SWAP = textwrap.dedent("""
    import os, sys
    from mtx.exporter import output
    from mtx.exporter.core import export
    from mtx.exporter.options import ExportOptions
    output.shutil.rmtree = lambda *a, **k: os._exit(9)  # die right after the swap, before the old copy is deleted
    export(sys.argv[1], sys.argv[2], ExportOptions(target="onnx", force=True))
""")


def test_force_replacement_is_atomic(ckpt, tmp_path):
    out = tmp_path / "out"
    export(ckpt, out, ExportOptions(target="onnxruntime"))
    res = subprocess.run([sys.executable, "-c", KILL_AFTER_SWAP, str(ckpt), str(out)], capture_output=True,
                         text=True, env=mtx_env(), timeout=300)
    assert res.returncode == 9, res.stderr
    assert read_manifest(out, verify_hashes=True).target == "onnx"  # the new export, complete
    leftovers = list(tmp_path.glob(".out.*.partial"))
    assert len(leftovers) == 1 and read_manifest(leftovers[0]).target == "onnxruntime"  # the old one, intact
    export(ckpt, tmp_path / "out", ExportOptions(target="onnx", force=True))
    assert not list(tmp_path.glob(".out.*"))


def test_concurrent_export_to_the_same_folder_is_refused(run_mtx, ckpt, tmp_path):
    out = tmp_path / "out"
    with open(tmp_path / ".out.lock", "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        one_line(run_mtx("export", ckpt, "-o", out), 2, "another mtx export to this folder is running")
    assert not out.exists()


def test_final_rename_fails_if_out_appeared(tmp_path):
    """Without force, a folder that appeared at OUT during the export is never replaced."""
    tmp, out = tmp_path / ".out.1.x.partial", tmp_path / "out"
    tmp.mkdir()
    (tmp / "mine").write_text("new")
    out.mkdir()
    (out / "theirs").write_text("keep")
    with pytest.raises(UsageError, match="appeared while exporting"):
        output.commit(tmp, out, force=False)
    assert (out / "theirs").read_text() == "keep" and (tmp / "mine").exists()
    output.commit(tmp, out, force=True)
    assert (out / "mine").read_text() == "new" and not tmp.exists()


def test_disk_full_is_one_line_and_leaves_nothing(ckpt, tmp_path):
    out = tmp_path / "out"
    script = textwrap.dedent("""
        import resource, signal, runpy, sys
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (20000, 20000))  # writes past 20 kB fail: a full disk
        sys.argv = ["mtx", "export", sys.argv[1], "-o", sys.argv[2], "--target", "onnx", "--dtype", "float16"]
        runpy.run_module("mtx", run_name="__main__")
    """)
    res = subprocess.run([sys.executable, "-c", script, str(ckpt), str(out)], capture_output=True, text=True,
                         env=mtx_env(), timeout=300)
    one_line(res, 1, "cannot write the export", "File too large")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("target", [".", ".."])
def test_out_of_cwd_or_above_is_refused_before_work(run_mtx, ckpt, tmp_path, target):
    work = tmp_path / "work"
    work.mkdir()
    t0 = time.time()
    res = run_mtx("export", ckpt, "-o", target, "--force", cwd=work)
    one_line(res, 2, "is the current folder or a folder above it")
    assert time.time() - t0 < 60 and sorted(p.name for p in work.iterdir()) == []

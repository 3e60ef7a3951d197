"""``mtx export`` as a user runs it: the folder it writes, the manifest, and clean one-line errors."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

from mtx.exporter import weights as weights_module
from mtx.exporter.core import export
from mtx.exporter.options import ExportOptions
from mtx.exporter.output import OutputError
from mtx.manifest import Manifest, read_manifest
from mtx.models.checkpoint import Checkpoint

# written next to the checkpoint's own (real) tokenizer.json, which the export checks by loading it
TOKENIZER = {"tokenizer_config.json": '{"model_max_length": 4096}', "special_tokens_map.json": '{"bos_token": "<s>"}'}


def assert_clean_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtx: error: "), res.stderr
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


def listing(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def checkpoint(ckpt_factory, tmp_path_factory) -> Path:
    """The tiny Mistral with tokenizer files next to it."""
    folder = tmp_path_factory.mktemp("ckpt") / "mistral"
    shutil.copytree(ckpt_factory("mistral"), folder)
    for name, text in TOKENIZER.items():
        (folder / name).write_text(text)
    return folder


@pytest.fixture(scope="module")
def cli_export(run_mtx, checkpoint, tmp_path_factory) -> tuple[Path, dict]:
    """One export through the command line (default target), with --json."""
    out = tmp_path_factory.mktemp("cli") / "out"
    res = run_mtx("export", checkpoint, "-o", out, "--json")
    assert res.returncode == 0, res.stderr
    return out, json.loads(res.stdout)


def test_folder_and_manifest(cli_export, checkpoint):
    out, printed = cli_export
    assert printed.pop("out") == str(out)
    on_disk = json.loads((out / "mtx.json").read_text())
    assert printed == on_disk
    m = read_manifest(out, verify_hashes=True)
    assert Manifest.from_dict(on_disk).to_dict() == on_disk  # round trip
    assert m == Manifest.from_dict(on_disk) and m.to_dict() == on_disk
    assert on_disk["kv"]["layout"] == m.kv.layout == "ort_window" and m.engine is None
    assert m.target == "onnxruntime" and m.dtype == "float32" and m.capacity == 8 and m.window == 8
    assert [s.name for s in m.inputs] == ["input_ids", "start_pos", "past_key.0", "past_value.0", "past_key.1",
                                          "past_value.1"]
    assert [s.name for s in m.outputs] == ["logits", "present_key.0", "present_value.0", "present_key.1",
                                           "present_value.1"]
    assert m.inputs[0].shape == ["batch", "seq"] and m.inputs[2].shape == ["batch", 2, 8, 16]
    assert m.outputs[0].shape == ["batch", "seq", 128]

    # every artifact is listed with its real sha256; tokenizer files were copied
    listed = {f.path: f for f in m.files}
    assert set(listing(out)) == set(listed) | {"mtx.json"}
    for path, entry in listed.items():
        assert hashlib.sha256((out / path).read_bytes()).hexdigest() == entry.sha256
    for name in ["tokenizer.json", *TOKENIZER, "generation_config.json"]:
        assert listed[name].role == "tokenizer" and (out / name).read_bytes() == (checkpoint / name).read_bytes()

    # the graph reads the packed [Wq; Wk; Wv], not the checkpoint's q/k/v: the checkpoint file is not
    # placed beside it (each weight once, docs/ops.md §6), every initializer is in model.onnx.data
    assert m.file("checkpoint-weights") == [] and not (out / "model.safetensors").exists()
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    refs = {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer}
    assert {r["location"] for r in refs.values()} == {"model.onnx.data"}
    assert m.weights["referenced_bytes"] == 0 and m.weights["written_tensors"] == len(refs)
    assert "layers.1.attn.wq.weight" not in refs and "layers.1.attn.wqkv.weight" in refs
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


def test_checkpoint_file_read_whole_is_referenced(checkpoint, tmp_path):
    """The onnx target reads every checkpoint tensor as stored: external data points into the checkpoint's
    own safetensors file, byte for byte, a copy or clone but never a hard link."""
    out = tmp_path / "out"
    m = export(checkpoint, out, ExportOptions(target="onnx")).manifest
    assert [f.path for f in m.file("checkpoint-weights")] == ["model.safetensors"]
    assert (out / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    assert os.stat(out / "model.safetensors").st_nlink == 1  # not a hard link (onnx refuses those)
    ck = Checkpoint(checkpoint)
    proto = onnx.load(str(out / "model.onnx"), load_external_data=False)
    refs = {t.name: {e.key: e.value for e in t.external_data} for t in proto.graph.initializer}
    wo = ck.sources["layers.1.attn.wo.weight"].refs[0]
    assert refs["layers.1.attn.wo.weight"] == {"location": "model.safetensors", "offset": str(wo.data_offset),
                                               "length": str(wo.nbytes)}
    # written: only what the export computes (inv_freq), nothing the checkpoint file holds
    assert {n for n, r in refs.items() if r["location"] == "model.onnx.data"} == {"inv_freq"}
    onnx.checker.check_model(str(out / "model.onnx"), full_check=True)


def test_summary_and_help(run_mtx, checkpoint, tmp_path):
    res = run_mtx("export", "--help")
    assert res.returncode == 0
    for option in ("--target", "--dtype", "--cache-capacity", "--max-batch", "--max-position", "--force", "--json",
                   "--out"):
        assert option in res.stdout
    out = tmp_path / "nested" / "out"  # missing parents are created
    res = run_mtx("export", checkpoint, "-o", out, "--target", "tensorrt", "--max-batch", "4")
    assert res.returncode == 0, res.stderr
    assert "target tensorrt" in res.stdout and "engine: not built" in res.stdout
    m = read_manifest(out)
    assert m.max_batch == 4 and m.engine is None and m.attention_op == "mtx::SlidingWindowGQA"


def test_replace_requires_force(run_mtx, cli_export, checkpoint, tmp_path):
    out, _ = cli_export
    before = (out / "mtx.json").read_bytes()
    assert_clean_error(run_mtx("export", checkpoint, "-o", out), str(out), "--force", "mtx export")
    assert (out / "mtx.json").read_bytes() == before
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    assert_clean_error(run_mtx("export", checkpoint, "-o", other), "not an mtx export", "--force")
    assert listing(other) == ["notes.txt"]
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert_clean_error(run_mtx("export", checkpoint, "-o", afile, "--force"), "not a folder")
    # --force replaces the earlier export; nothing else is left next to it
    res = run_mtx("export", checkpoint, "-o", other, "--target", "onnx", "--force")
    assert res.returncode == 0, res.stderr
    assert read_manifest(other).target == "onnx" and "notes.txt" not in listing(other)
    assert listing(tmp_path) == ["afile", "other"]


@pytest.mark.parametrize("args,needles", [
    (["--dtype", "float8"], ["--dtype", "float8"]),
    (["--cache-capacity", "4"], ["--cache-capacity", "sliding window 8"]),
    (["--cache-capacity", "many"], ["--cache-capacity", "many"]),
    (["--target", "foo"], ["--target", "foo"]),
    (["--max-batch", "0"], ["--max-batch"]),
    (["--max-position", "100", "--target", "onnx"], ["--max-position", "onnxruntime"]),
])
def test_bad_options(run_mtx, checkpoint, tmp_path, args, needles):
    parent = tmp_path / "parent"
    parent.mkdir()
    assert_clean_error(run_mtx("export", checkpoint, "-o", parent / "out", *args), *needles)
    assert listing(parent) == []


def test_never_replaces_the_checkpoint(run_mtx, checkpoint, tmp_path):
    folder = tmp_path / "ckpt"
    shutil.copytree(checkpoint, folder)
    assert_clean_error(run_mtx("export", folder, "-o", folder, "--force"), "checkpoint folder")
    assert_clean_error(run_mtx("export", folder / "model.safetensors", "-o", tmp_path / "out"), "expected a checkpoint")
    assert listing(tmp_path) == ["ckpt"] and (folder / "model.safetensors").is_file()


def _broken(checkpoint: Path, tmp_path: Path, how: str) -> tuple[Path, str]:
    folder = tmp_path / "broken"
    shutil.copytree(checkpoint, folder)
    st = folder / "model.safetensors"
    if how == "truncated":
        st.write_bytes(st.read_bytes()[:-1000])
        return folder, str(st)
    if how == "missing-tensor":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(st))
        tensors.pop("model.layers.1.mlp.down_proj.weight")
        save_file(tensors, str(st))
        return folder, "model.layers.1.mlp.down_proj.weight"
    if how == "no-config":
        (folder / "config.json").unlink()
        return folder, str(folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_attention_heads"] = 3  # not a multiple of the KV heads
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder, "num_attention_heads"


@pytest.mark.parametrize("how", ["truncated", "missing-tensor", "no-config", "bad-config"])
def test_bad_checkpoint(run_mtx, checkpoint, tmp_path, how):
    folder, needle = _broken(checkpoint, tmp_path, how)
    parent = tmp_path / "parent"
    parent.mkdir()
    assert_clean_error(run_mtx("export", folder, "-o", parent / "out"), needle)
    assert listing(parent) == []


def test_failure_leaves_nothing(checkpoint, tmp_path, monkeypatch):
    """A failure while weights are written (here: a full disk) removes the partial folder and its parents."""
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(weights_module, "_copy_hashing", full_disk)
    with pytest.raises(OutputError, match="cannot write the export .No space left on device"):  # one line, exit 1
        export(checkpoint, tmp_path / "new" / "out", ExportOptions(target="onnx"))
    assert listing(tmp_path) == []


def test_tensorrt_engine_build(checkpoint, tmp_path, monkeypatch):
    """With TensorRT and the plugins present, mtx.exporter.tensorrt_engine.build_engine is called and the engine listed."""
    import types

    calls = []

    def build_engine(onnx_path, engine_path, **kwargs):
        calls.append((Path(onnx_path).name, kwargs))
        Path(engine_path).write_bytes(b"engine")

    import mtx

    fake = types.ModuleType("mtx.tensorrt")
    fake.available = lambda: (True, "")
    monkeypatch.setitem(sys.modules, "mtx.tensorrt", fake)
    monkeypatch.setattr(mtx, "tensorrt", fake, raising=False)
    builder = types.ModuleType("mtx.exporter.tensorrt_engine")  # the engine-build export step
    builder.build_engine = build_engine
    monkeypatch.setitem(sys.modules, "mtx.exporter.tensorrt_engine", builder)
    result = export(checkpoint, tmp_path / "trt", ExportOptions(target="tensorrt", max_batch=2))
    m = read_manifest(tmp_path / "trt", verify_hashes=True)
    assert calls == [("model.onnx", {"dtype": "float32", "batch": (1, 2, 2)})]
    assert m.engine == "model.engine" and m.engine_status == "built" and m.file("engine")[0].bytes == 6
    assert "engine: built" in result.notes

    fake.available = lambda: (False, "TensorRT 10 and libmtx_plugins.so not found")
    export(checkpoint, tmp_path / "trt", ExportOptions(target="tensorrt", force=True))
    m = read_manifest(tmp_path / "trt")
    assert m.engine is None and m.engine_status == "not built: TensorRT 10 and libmtx_plugins.so not found"

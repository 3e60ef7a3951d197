"""Bad checkpoints: exit code 2, one line naming the file and tensor, no traceback."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from safetensors import safe_open
from safetensors.torch import save_file


def assert_clean_error(res: subprocess.CompletedProcess, *needles: str) -> None:
    assert res.returncode == 2, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("mtx: error: ")
    assert "Traceback" not in res.stderr
    for n in needles:
        assert n in lines[0], lines[0]


@pytest.fixture
def broken(ckpt_factory, tmp_path):
    def copy(name: str = "mistral"):
        dst = tmp_path / name
        shutil.copytree(ckpt_factory(name), dst)
        return dst
    return copy


def rewrite(path, mutate):
    with safe_open(str(path), framework="pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    mutate(tensors)
    save_file(tensors, str(path))


def test_good_checkpoint_passes(run_mtx, ckpt_factory):
    res = run_mtx("inspect", str(ckpt_factory("mixtral4")), "--json", "--verify")
    assert res.returncode == 0, res.stderr
    info = json.loads(res.stdout)
    assert info["config"]["num_experts"] == 4


def test_truncated_safetensors(run_mtx, broken):
    d = broken()
    f = d / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1000])
    assert_clean_error(run_mtx("inspect", str(d)), str(f), "truncated")


def test_corrupt_header(run_mtx, broken):
    d = broken()
    f = d / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"not json!!!!"
    f.write_bytes(bytes(data))
    assert_clean_error(run_mtx("inspect", str(d)), str(f))


def test_missing_tensor(run_mtx, broken):
    d = broken()
    rewrite(d / "model.safetensors", lambda t: t.pop("model.layers.1.self_attn.k_proj.weight"))
    assert_clean_error(run_mtx("inspect", str(d)), "model.layers.1.self_attn.k_proj.weight", "missing tensor")


def test_wrong_shape(run_mtx, broken):
    d = broken()

    def mutate(t):
        t["model.layers.0.mlp.up_proj.weight"] = t["model.layers.0.mlp.up_proj.weight"][:-1].clone()
    rewrite(d / "model.safetensors", mutate)
    assert_clean_error(run_mtx("inspect", str(d)), str(d / "model.safetensors"),
                       "model.layers.0.mlp.up_proj.weight", "[95, 64]", "[96, 64]")


def test_wrong_expert_shape_in_shard(run_mtx, broken):
    d = broken("sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    shard = d / index["weight_map"][key]

    def mutate(t):
        t[key] = t[key][:, :-2].clone()
    rewrite(shard, mutate)
    assert_clean_error(run_mtx("inspect", str(d)), str(shard), key)


def test_missing_shard(run_mtx, broken):
    d = broken("sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (d / shard).unlink()
    assert_clean_error(run_mtx("inspect", str(d)), shard, "missing")


def test_unknown_model_type(run_mtx, broken):
    d = broken()
    cfg = json.loads((d / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_mtx("inspect", str(d)), str(d / "config.json"), "unknown model_type 'gpt2'")


def test_config_missing_keys(run_mtx, broken):
    d = broken()
    cfg = json.loads((d / "config.json").read_text())
    del cfg["num_hidden_layers"], cfg["vocab_size"]
    (d / "config.json").write_text(json.dumps(cfg))
    assert_clean_error(run_mtx("inspect", str(d)), str(d / "config.json"), "num_hidden_layers", "vocab_size")


def test_debug_shows_traceback(run_mtx, broken):
    d = broken()
    (d / "config.json").write_text("{")
    res = run_mtx("--debug", "inspect", str(d))
    assert res.returncode != 0 and "Traceback" in res.stderr


def test_help_lists_commands(run_mtx):
    res = run_mtx("--help")
    assert res.returncode == 0
    assert "inspect" in res.stdout


@pytest.mark.parametrize("kwargs,param,flag", [
    (dict(temperature=-1.0), "temperature", "--temperature"),
    (dict(top_p=0.0), "top_p", "--top-p"),
    (dict(repetition_penalty=0.0), "repetition_penalty", "--repetition-penalty"),
])
def test_library_errors_name_parameters_cli_names_flags(run_mtx, ckpt_factory, kwargs, param, flag):
    """The Python API names its own parameter (no CLI flag); the CLI shows the same error with its flag."""
    import mtx
    from mtx.errors import UsageError

    folder = ckpt_factory("mistral")
    with pytest.raises(UsageError) as info:
        mtx.load(folder).generate([[1, 2, 3]], max_new_tokens=2, **kwargs)
    message = str(info.value)
    assert message.startswith(param) and "--" not in message and info.value.params == (param,)
    value = str(next(iter(kwargs.values())))
    res = run_mtx("generate", str(folder), "--ids", "1,2,3", "--max-new-tokens", "2", flag, value)
    assert_clean_error(res, flag)
    assert res.stderr.strip() == f"mtx: error: {message.replace(param, flag, 1)}"

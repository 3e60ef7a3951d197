"""ONNX Runtime's intra-op spin-wait as an option (``session.intra_op.allow_spinning``): ``mtx.load(spin=)``,
``--spin/--no-spin`` of mtx generate/bench/serve, ServeOptions and the Ray Serve build arguments.

What the session was opened with is read back from ONNX Runtime itself (its SessionOptions); the
default is off (README, "Spinning": measured on a loaded and an idle machine).
"""

from __future__ import annotations

import json

import pytest

import mtx.runtime
from mtx.errors import UsageError

ALLOW_SPINNING = "session.intra_op.allow_spinning"


def _spinning(gen) -> str:
    return gen.backend.session.get_session_options().get_session_config_entry(ALLOW_SPINNING)


@pytest.fixture(scope="module")
def export(parity_export):
    return parity_export("mistral", "onnxruntime")


def test_load_spin_reaches_the_session(export):
    assert mtx.runtime.DEFAULT_SPIN is False
    default, on, off = (mtx.runtime.load(export, **kw) for kw in ({}, {"spin": True}, {"spin": False}))
    assert (_spinning(default), _spinning(on), _spinning(off)) == ("0", "1", "0")
    prompt = [5, 17, 99, 3]
    assert on.generate([prompt], max_new_tokens=8) == off.generate([prompt], max_new_tokens=8)


@pytest.mark.parametrize("value", ["yes", 1, None])
def test_load_spin_must_be_a_bool(export, value):
    with pytest.raises(UsageError, match=r"^spin: expected true or false, got "):
        mtx.runtime.load(export, spin=value)


def test_cli_spin_option(run_mtx, export):
    from mtx.cli import main

    for command in ("generate", "bench", "serve"):
        (spin,) = [p for p in main.commands[command].params if p.name == "spin"]
        assert spin.opts == ["--spin"] and spin.secondary_opts == ["--no-spin"], command
        assert spin.default is mtx.runtime.DEFAULT_SPIN, command
        res = run_mtx(command, "--help")
        assert res.returncode == 0 and "--spin / --no-spin" in res.stdout, command
    outputs = []
    for flag in ("--spin", "--no-spin"):
        res = run_mtx("generate", export, "--ids", "5,17,99", "--max-new-tokens", "6", "--json", flag)
        assert res.returncode == 0, res.stderr
        outputs.append(json.loads(res.stdout)["ids"])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 6
    res = run_mtx("bench", export, "--prompt-len", "4", "--new-tokens", "4", "--json", "--spin")
    assert res.returncode == 0, res.stderr


def test_serve_options_spin(export):
    from mtx.serving.server import ServeOptions, load_server

    with pytest.raises(UsageError, match="spin must be true or false"):
        ServeOptions(spin="no")
    server = load_server(export, ServeOptions(spin=True, max_batch=2))
    try:
        assert _spinning(server.engine.generator) == "1"
    finally:
        server.close()


def test_ray_build_arguments(monkeypatch, export):
    pytest.importorskip("ray")
    from mtx.serving import ray_app

    seen = []
    monkeypatch.setattr(ray_app, "application", lambda out, options, replicas, autoscaling: seen.append(options))
    ray_app.build({"out": str(export), "spin": "true"})
    ray_app.build({"out": str(export), "spin": "False", "verify": "0"})
    ray_app.build({"out": str(export)})
    assert [(o.spin, o.verify) for o in seen] == [(True, True), (False, False), (False, True)]
    with pytest.raises(UsageError, match=r"^spin: expected true or false, got 'maybe'"):
        ray_app.build({"out": str(export), "spin": "maybe"})

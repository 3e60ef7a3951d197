"""``mtx parity`` on correct exports: passes within 1e-4 (float32) for every target and model kind,
reads each layer's residual stream from the artifact, compares backends with Polygraphy, writes the
Polygraphy data loader, and refuses bad input in one line (exit 2).

The oracle is the PyTorch reference built from the checkpoint; nothing here compares the artifact
with itself. Checkpoints are the tiny ones of conftest.VARIANTS (window 8, capacity 8).
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from mtx.cli import main
from mtx.manifest import read_manifest
from mtx.parity import ParityOptions, run_parity
from mtx.parity import report as parity_report
from mtx.parity.compare import BackendComparison
from mtx.parity.core import tensorrt_unavailable
from mtx.parity.schedule import default_chunk, plan_schedule

ATOL = 1e-4


def run_cli(*args: object) -> tuple[int, str, str]:
    """``mtx ARGS`` in this process: (exit code, stdout, stderr)."""
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def assert_one_line_error(code: int, stderr: str, *needles: str) -> None:
    assert code == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("mtx: error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


@pytest.mark.parametrize("target", ["onnxruntime", "onnx"])
@pytest.mark.parametrize("variant", ["mistral", "mistral_full", "mixtral4"])
def test_correct_export_passes(parity_export, ckpt_factory, variant, target):
    out = parity_export(variant, target)
    report = run_parity(ckpt_factory(variant), out, ParityOptions(per_layer=True))
    sched = report.schedule
    (res,) = report.ran
    assert res.name == "onnxruntime" and report.passed and report.exit_code == 0
    assert res.logits["max_abs"].max() <= ATOL and res.within.all()
    assert res.layer_max_abs.shape == (2, 2, sched.positions) and res.layer_max_abs.max() <= ATOL
    assert res.finding.code == "match" and report.findings == []
    assert res.logits["top1"].all() and (res.logits["top5_overlap"] == 5).all()

    # the schedule the issue asks for: chunk boundaries cross window boundaries, >= 3 wraps of decoding
    prefill = [c for c in sched.calls if c.phase == "prefill"]
    decode = [c for c in sched.calls if c.phase == "decode"]
    assert all(c.length == 1 for c in decode) and len(decode) == sched.steps
    if variant == "mistral_full":
        assert sched.window == 0 and sched.positions == 64 and "full attention" in report.notes[0]
    else:
        assert sched.window == 8 and sched.chunk == 3 and 8 % sched.chunk != 0
        assert sched.prompt_len > 2 * 8 and sched.steps >= 3 * 8 and report.notes == []
        assert any(c.start < 8 < c.stop for c in prefill)  # a chunk straddles the first window boundary

    data = parity_report.to_json(report)
    steps = data["backends"]["onnxruntime"]["steps"]
    assert [s["position"] for s in steps] == list(range(sched.positions))
    assert data["backends"]["onnxruntime"]["summary"]["greedy"]["first_divergence"] is None
    # decoding is teacher-forced with the reference's greedy token
    assert [s["input_token"] for s in steps[sched.prompt_len:]] == [s["reference_token"] for s in
                                                                     steps[sched.prompt_len - 1:-1]]


def test_cli_json_plot_and_backend_comparison(run_mtx, parity_export, ckpt_factory, tmp_path):
    """The whole command in a subprocess: --json on stdout, --plot written, Polygraphy pair check."""
    out = parity_export("mixtral4", "onnx")
    before = {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()}
    plot = tmp_path / "parity.png"
    res = run_mtx("parity", ckpt_factory("mixtral4"), out, "--json", "--per-layer", "--backends", "onnxruntime,torch",
                  "--plot", plot, "--steps", "20", timeout=300)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)  # one object, nothing else on stdout
    assert data["passed"] is True and data["exit_code"] == 0 and data["tolerance"]["atol"] == ATOL
    assert set(data["backends"]) == {"onnxruntime", "torch"}
    assert data["backends"]["onnxruntime"]["layers"][1]["after_block"]["max_abs"] <= ATOL
    assert data["run"]["window_boundaries"][:2] == [8, 16] and data["run"]["steps"] == 20
    assert any("fewer than 3 wraps" in n for n in data["notes"])  # 20 < 3·C = 24 is reported
    (pair,) = data["comparisons"]
    assert pair["tool"] == "polygraphy" and pair["backends"] == ["onnxruntime", "torch"] and pair["passed"]
    assert pair["calls_compared"] == len(data["run"]["prefill_chunks"]) + 20
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["parity.png"]  # written atomically, nothing left over
    # --per-layer promoted the layer values in memory only: OUT is untouched
    assert {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in out.iterdir()} == before
    read_manifest(out, verify_hashes=True)


def test_backend_comparison_uses_polygraphy():
    """Polygraphy's verdict per call; the pair tolerance is twice the reference tolerance."""
    cmp = BackendComparison(["onnxruntime", "tensorrt"])
    base = np.linspace(-3, 3, 40, dtype=np.float32).reshape(2, 20)
    cmp.add_call(0, {"onnxruntime": base, "tensorrt": base + 1.5e-4}, limit=1e-4)
    cmp.add_call(2, {"onnxruntime": base, "tensorrt": base + np.float32(3e-4) * (np.arange(20) == 7)}, limit=1e-4)
    (pair,) = cmp.results
    assert pair.passed_calls == [True, False] and not pair.passed
    assert pair.to_json()["first_failed_call_start"] == 2 and abs(pair.to_json()["max_absdiff"] - 3e-4) < 1e-6


def test_prompt_text_and_short_run_notes(parity_export, ckpt_factory):
    out = parity_export("mistral", "onnxruntime")
    report = run_parity(ckpt_factory("mistral"), out, ParityOptions(prompt="w3 w4 w5 w60 w7", steps=4))
    assert report.passed and report.schedule.prompt_ids == [3, 4, 5, 60, 7] and report.schedule.positions == 9
    assert any("fewer than 3 wraps" in n for n in report.notes)
    assert any("does not go past the window" in n for n in report.notes)


def test_layer_outputs_are_values_of_every_target(parity_export, ckpt_factory):
    for target in ("onnxruntime", "onnx"):
        out = parity_export("mixtral4", target)
        m = read_manifest(out, verify_hashes=True)
        graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
        produced = {o for n in graph.node for o in n.output}
        assert [lo.layer for lo in m.layer_outputs] == [0, 1]
        for lo in m.layer_outputs:
            for name in (lo.after_attention, lo.after_block):
                assert name in produced and name not in {o.name for o in graph.output}
        assert [o.name for o in graph.output] == [s.name for s in m.outputs]


def test_polygraphy_data_loader(parity_export):
    """Listed as tooling; first-call feeds matching the graph inputs; `polygraphy run --onnxrt` runs it."""
    for variant, target in (("mixtral4", "onnxruntime"), ("mistral", "onnx")):
        out = parity_export(variant, target)
        m = read_manifest(out)
        assert [(f.path, f.role) for f in m.files if f.role == "tooling"] == [("polygraphy_data_loader.py", "tooling")]
        (feed,) = list(runpy.run_path(str(out / "polygraphy_data_loader.py"))["load_data"]())[:1]
        assert list(feed) == [s.name for s in m.inputs]
        assert feed["input_ids"].shape == (1, 1) and feed["input_ids"].dtype == np.int64
        assert 0 <= feed["input_ids"].min() and feed["input_ids"].max() < m.config["vocab_size"]
        assert feed["start_pos"].tolist() == [0]
        assert all(feed[s.name].shape == (1, *s.shape[1:]) and feed[s.name].dtype == np.float32 and
                   not feed[s.name].any() for s in m.inputs[2:])
        polygraphy = shutil.which("polygraphy", path=os.path.dirname(sys.executable)) or shutil.which("polygraphy")
        assert polygraphy, "polygraphy is a dependency of mtx parity"
        env = dict(os.environ, MTX_POLYGRAPHY_SEQ="5")
        res = subprocess.run([polygraphy, "run", str(out / "model.onnx"), "--onnxrt", "--data-loader-script",
                              str(out / "polygraphy_data_loader.py")], capture_output=True, text=True, timeout=300,
                             env=env)
        assert res.returncode == 0 and "PASSED" in res.stdout, res.stdout[-2000:] + res.stderr[-2000:]
        assert "input_ids [dtype=int64, shape=(1, 5)]" in res.stdout


def test_bad_input_is_one_line_exit_2(parity_export, ckpt_factory, tmp_path):
    out = parity_export("mistral", "onnxruntime")
    ckpt = ckpt_factory("mistral")
    assert_one_line_error(*run_cli("parity", ckpt, tmp_path / "missing")[::2], "missing", "no such folder")
    assert_one_line_error(*run_cli("parity", ckpt, tmp_path)[::2], str(tmp_path), "not an mtx export")
    assert_one_line_error(*run_cli("parity", ckpt_factory("mixtral4"), out)[::2], "config does not match",
                          "model_type")
    assert_one_line_error(*run_cli("parity", ckpt, out, "--backends", "onnxruntime,tflite")[::2], "--backends",
                          "'tflite'")
    assert_one_line_error(*run_cli("parity", ckpt, out, "--prompt", "w3", "--prompt-len", "4")[::2], "--prompt")
    assert_one_line_error(*run_cli("parity", ckpt, out, "--steps", "-1")[::2], "--steps")
    assert_one_line_error(*run_cli("parity", ckpt, out, "--plot", tmp_path / "no" / "p.png")[::2], "--plot")
    assert_one_line_error(*run_cli("parity", ckpt, out, "--backends", "tensorrt")[::2], "--backends tensorrt",
                          "no TensorRT engine")
    full = parity_export("mistral_full", "onnx")
    assert_one_line_error(*run_cli("parity", ckpt_factory("mistral_full"), full, "--steps", "100")[::2],
                          "exceed the KV capacity 64")


def test_tensorrt_engine_without_tensorrt(parity_export, ckpt_factory, tmp_path):
    """An export with an engine: tensorrt joins the default backends; where it cannot run it is skipped
    with the reason (default) or refused (asked for by name)."""
    src = parity_export("mistral", "tensorrt")
    out = tmp_path / "with-engine"
    shutil.copytree(src, out)
    (out / "model.engine").write_bytes(b"engine")
    data = json.loads((out / "mtx.json").read_text())
    data.update(engine="model.engine", engine_status="built")
    data["files"].append({"path": "model.engine", "role": "engine", "bytes": 6, "sha256": "0" * 64})
    (out / "mtx.json").write_text(json.dumps(data))
    reason = tensorrt_unavailable(read_manifest(out), out)
    if reason is None:
        pytest.skip("TensorRT can run here: a fake engine would not load (the GPU tests run real engines)")
    report = run_parity(ckpt_factory("mistral"), out, ParityOptions(steps=3))
    assert [(b.name, b.status) for b in report.backends] == [("onnxruntime", "ran"), ("tensorrt", "skipped")]
    assert report.backends[1].reason == reason and report.passed
    assert_one_line_error(*run_cli("parity", ckpt_factory("mistral"), out, "--backends", "tensorrt")[::2],
                          "--backends tensorrt", reason)


def test_schedule_defaults():
    for w in [*range(1, 300), 4096, 32768]:
        c = default_chunk(w)
        assert w % c != 0 and 2 <= c <= 258
    sched = plan_schedule(window=4096, capacity=4096, max_position=None, vocab_size=32000, prompt_ids=None,
                          prompt_len=None, steps=None, chunk=None, seed=0)
    assert sched.chunk == 257 and sched.prompt_len == 2 * 4096 + 1 and sched.steps == 3 * 4096 + 257
    assert sched.notes == [] and sched.window_boundaries()[:2] == [4096, 8192]

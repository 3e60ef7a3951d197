"""The C++ runtime (cpp/, libmtx_runtime) against the Python runtime (mtx.runtime) and HF tokenizers.

cpp/ is configured and built once per session into build/cpp (Release, -j2; a rebuild is incremental),
and its GoogleTest unit tests run through ctest. The driver build/cpp/mtx_cpp_check takes one JSON
request (docs in cpp/tools/cpp_check.cpp) and prints one JSON result; these tests compare its tokens
and logits with the Python runtime's on the same exports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
BUILD = ROOT / "build" / "cpp"
PREFILL_CHUNK = 5  # prompts of 3-5x the window of 8 are fed in several chunks
PROMPT = [5, 17, 99, 3, 42, 8, 11]
N_NEW = 30  # prompt 7 + 30 tokens: more than 3 wraps of the window of 8 (capacity 8)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


@pytest.fixture(scope="session")
def cpp_build() -> Path:
    """build/cpp configured (once) and built (incremental), with scripts/setup_cpp.sh's dependencies."""
    r = _run([str(ROOT / "scripts" / "setup_cpp.sh")])
    assert r.returncode == 0, f"scripts/setup_cpp.sh failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    steps = []
    if not (BUILD / "CMakeCache.txt").is_file():
        steps.append(["cmake", "-S", str(ROOT / "cpp"), "-B", str(BUILD), "-DCMAKE_BUILD_TYPE=Release",
                      f"-DMTX_PYTHON={sys.executable}"])
    steps.append(["cmake", "--build", str(BUILD), "-j2"])
    for step in steps:
        r = _run(step)
        assert r.returncode == 0, f"{' '.join(step)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return BUILD


def check(build: Path, tmp_path: Path, request: dict, expect_error: bool = False) -> dict:
    """Run mtx_cpp_check on ``request``; its JSON result (or {"error": ...} with exit status 2)."""
    req = tmp_path / f"req-{os.getpid()}-{len(list(tmp_path.iterdir()))}.json"
    req.write_text(json.dumps(request))
    r = _run([str(build / "mtx_cpp_check"), str(req)], timeout=600)
    assert r.returncode in (0, 2), f"mtx_cpp_check crashed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    out = json.loads(r.stdout)
    if expect_error:
        assert r.returncode == 2 and "error" in out, out
    else:
        assert r.returncode == 0, out
    return out


def py_load(export: Path, **kw):
    import mtx.runtime

    return mtx.runtime.load(export, prefill_chunk=PREFILL_CHUNK, **kw)


CASES = [("mistral", "onnxruntime"), ("mistral", "onnx"), ("mixtral4", "onnxruntime"), ("mixtral4", "onnx")]


@pytest.mark.parametrize("variant,target", CASES)
def test_greedy_and_score_match_python(cpp_build, parity_export, tmp_path, variant, target):
    export = parity_export(variant, target)
    gen = py_load(export)
    want = gen.generate([PROMPT], max_new_tokens=N_NEW, stop_token_ids=[])[0]
    got = check(cpp_build, tmp_path, {"op": "generate", "export": str(export), "prompts": [PROMPT],
                                      "max_new_tokens": N_NEW, "stop": [], "prefill_chunk": PREFILL_CHUNK})
    assert got["tokens"][0] == want
    seq = PROMPT + want  # 37 tokens: chunked prefill through >= 3 wraps of the window
    ref = gen.score(seq)
    out = tmp_path / "logits.bin"
    check(cpp_build, tmp_path, {"op": "score", "export": str(export), "tokens": seq, "out": str(out),
                                "prefill_chunk": PREFILL_CHUNK})
    logits = np.fromfile(out, dtype=np.float32).reshape(ref.shape)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5)


PROMPTS = [[5, 17, 99, 3, 42, 8, 11], [64, 3, 77], [9] * 13]
SAMPLING = [dict(temperature=0.9, seed=7), dict(temperature=1.3, top_k=12, seed=2**62 + 5),
            dict(temperature=0.7, top_p=0.8, repetition_penalty=1.4, seed=99),
            dict(temperature=1.0, top_k=30, top_p=0.95, repetition_penalty=0.8, seed=0)]


@pytest.mark.parametrize("variant,target", [("mistral", "onnxruntime"), ("mixtral4", "onnx")])
def test_seeded_sampling_matches_python(cpp_build, parity_export, tmp_path, variant, target):
    """Session (stream 0) and batch (row r = stream r, rows decoded together) token for token."""
    export = parity_export(variant, target)
    gen = py_load(export)
    for params in SAMPLING:
        want = [gen.session() for _ in PROMPTS]
        for s, p in zip(want, PROMPTS):
            s.append(p)
        want_tokens = [s.generate(N_NEW, stop_token_ids=[], **params) for s in want]
        got = check(cpp_build, tmp_path, {"op": "generate", "export": str(export), "prompts": PROMPTS,
                                          "max_new_tokens": N_NEW, "stop": [], "sampling": params,
                                          "prefill_chunk": PREFILL_CHUNK})
        assert got["tokens"] == want_tokens, params
        assert len({tuple(t) for t in want_tokens}) > 1  # sampled, not one greedy run
        batch = gen.generate(PROMPTS, max_new_tokens=N_NEW, stop_token_ids=[], **params)
        got = check(cpp_build, tmp_path, {"op": "generate", "mode": "batch", "export": str(export),
                                          "prompts": PROMPTS, "max_new_tokens": N_NEW, "stop": [],
                                          "sampling": params, "prefill_chunk": PREFILL_CHUNK})
        assert got["tokens"] == batch, params


def test_turns_and_stop_ids_match_python(cpp_build, parity_export, tmp_path):
    """Multi-turn session (the last generated token pending until the next turn) and stop ids."""
    export = parity_export("mistral", "onnx")
    s = py_load(export).session()
    want = []
    for turn in PROMPTS:
        s.append(turn)
        want.append(s.generate(9, stop_token_ids=[], temperature=0.8, seed=3))
    got = check(cpp_build, tmp_path, {"op": "turns", "export": str(export), "turns": PROMPTS, "max_new_tokens": 9,
                                      "stop": [], "sampling": {"temperature": 0.8, "seed": 3},
                                      "prefill_chunk": PREFILL_CHUNK})
    assert got["tokens"] == want
    stop = want[0][4]  # stop at the first occurrence of this token (included)
    got = check(cpp_build, tmp_path, {"op": "turns", "export": str(export), "turns": PROMPTS[:1], "max_new_tokens": 9,
                                      "stop": [stop], "sampling": {"temperature": 0.8, "seed": 3},
                                      "prefill_chunk": PREFILL_CHUNK})
    assert got["tokens"][0] == want[0][:want[0].index(stop) + 1]

"""mtx.runtime against transformers (full-sequence forwards, no cache) and against itself run alone."""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest
import torch

from conftest import hf_logits, mtx_env
from mtx.errors import UsageError

PROMPTS = [[5, 17, 99, 3, 42, 8, 11], [64, 2 + 1, 77], [9] * 13]


def hf_greedy(folder, prompt: list[int], n: int) -> list[int]:
    """Oracle: greedy decoding by re-running transformers on the whole sequence each step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation="eager", dtype=torch.float32).eval()
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


#: backend name -> export target. "torch" runs the checkpoint through the PyTorch reference;
#: "onnxruntime" runs an onnxruntime-target export (GroupQueryAttention, shared opaque buffers);
#: "onnx" runs an onnx-target export in ONNX Runtime (mtx function bodies, separate ring buffers).
BACKENDS = {"torch": None, "onnxruntime": "onnxruntime", "onnx": "onnx"}


@pytest.fixture(scope="module", params=list(BACKENDS))
def backend_name(request):
    return request.param


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """(checkpoint folder, target, capacity) -> export folder, made once per module."""
    cache = {}

    def get(folder, target, capacity):
        from mtx.exporter.core import export
        from mtx.exporter.options import ExportOptions

        key = (str(folder), target, capacity)
        if key not in cache:
            out = tmp_path_factory.mktemp("export") / "out"
            export(folder, out, ExportOptions(target=target, cache_capacity=capacity, max_batch=8))
            cache[key] = out
        return cache[key]

    return get


@pytest.fixture
def load(backend_name, artifacts):
    """load(checkpoint_folder, capacity=None, max_batch=8) -> Generator on this test's backend."""
    import mtx.runtime

    def make(folder, capacity=None, max_batch=8, prefill_chunk=5):
        target = BACKENDS[backend_name]
        if target is None:
            return mtx.runtime.load(folder, backend="torch", capacity=capacity, max_batch=max_batch,
                                    prefill_chunk=prefill_chunk)
        return mtx.runtime.load(artifacts(folder, target, capacity), max_batch=max_batch, prefill_chunk=prefill_chunk)

    return make


@pytest.mark.parametrize("name", ["mistral", "mixtral4", "mistral_full"])
def test_generate_matches_transformers(ckpt_factory, load, name):
    folder = ckpt_factory(name)
    gen = load(folder, capacity=64 if name == "mistral_full" else None)
    n = 30  # prompt 7 + 30 tokens: several windows of 8
    got = gen.generate([PROMPTS[0]], max_new_tokens=n, stop_token_ids=[])[0]
    assert got == hf_greedy(folder, PROMPTS[0], n)


@pytest.mark.parametrize("name", ["mistral", "mixtral4"])
def test_score_matches_transformers(ckpt_factory, load, name):
    folder = ckpt_factory(name)
    ids = torch.randint(0, 128, (1, 37), generator=torch.Generator().manual_seed(11))
    ref = hf_logits(folder, ids)[0].numpy()
    got = load(folder).score(ids[0].tolist())
    assert got.shape == ref.shape
    assert np.abs(got - ref).max() <= 1e-4


def test_ragged_batch_equals_alone(ckpt_factory, load):
    gen = load(ckpt_factory("mixtral4"))
    together = gen.generate(PROMPTS, max_new_tokens=20, stop_token_ids=[])
    for p, t in zip(PROMPTS, together):
        assert gen.generate([p], max_new_tokens=20, stop_token_ids=[])[0] == t


def test_seeded_sampling_reproducible(ckpt_factory, load):
    gen = load(ckpt_factory("mistral"))
    kw = dict(max_new_tokens=24, temperature=1.0, top_k=50, top_p=0.95, stop_token_ids=[])
    a = gen.generate(PROMPTS, seed=7, **kw)
    b = gen.generate(PROMPTS, seed=7, **kw)
    c = gen.generate(PROMPTS, seed=8, **kw)
    assert a == b
    assert a != c
    greedy = gen.generate(PROMPTS, max_new_tokens=24, stop_token_ids=[])
    assert a != greedy  # sampling did sample
    assert gen.generate(PROMPTS[:1], seed=7, **kw)[0] == a[0]  # row 0 of a batch draws as a request alone


def test_stop_tokens(ckpt_factory, load):
    gen = load(ckpt_factory("mistral"))
    free = gen.generate([PROMPTS[0]], max_new_tokens=20, stop_token_ids=[])[0]
    stop = free[6]
    first = free.index(stop)
    got = gen.generate([PROMPTS[0]], max_new_tokens=20, stop_token_ids=[stop])[0]
    assert got == free[: first + 1]


def test_session_continuation_equals_single_shot(ckpt_factory, load):
    gen = load(ckpt_factory("mixtral4"))
    s = gen.session()
    s.append(PROMPTS[0])
    g1 = s.generate(9, stop_token_ids=[])
    s.append(PROMPTS[1])
    g2 = s.generate(12, stop_token_ids=[])
    assert s.position == len(s.tokens) - 1  # last generated token is pending
    single = gen.generate([PROMPTS[0] + g1 + PROMPTS[1]], max_new_tokens=12, stop_token_ids=[])[0]
    assert g2 == single


def test_sessions_on_threads(ckpt_factory, load):
    gen = load(ckpt_factory("mistral"))
    expect = [gen.generate([p], max_new_tokens=16, stop_token_ids=[])[0] for p in PROMPTS]
    results: dict[int, list[int]] = {}

    def work(i: int) -> None:
        s = gen.session()
        s.append(PROMPTS[i % 3])
        results[i] = s.generate(16, stop_token_ids=[])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(results[i] == expect[i % 3] for i in range(6))


@pytest.mark.parametrize("prompts,needle", [
    ([[1, 2, 500]], "token id 500 is out of range"),
    ([[]], "empty"),
    ([[1]] * 9, "exceeds the maximum batch 8"),
])
def test_bad_input(ckpt_factory, load, prompts, needle):
    gen = load(ckpt_factory("mistral"), max_batch=8)
    with pytest.raises(UsageError, match=needle):
        gen.generate(prompts, max_new_tokens=2)


def test_full_attention_refuses_past_capacity(ckpt_factory, load):
    gen = load(ckpt_factory("mistral_full"), capacity=16)
    with pytest.raises(UsageError, match="exceeds the KV capacity 16"):
        gen.generate([PROMPTS[0]], max_new_tokens=10)


@pytest.mark.tensorrt
@pytest.mark.parametrize("name", ["mistral", "mixtral4"])
def test_tensorrt_backend_matches_transformers(ckpt_factory, tmp_path, name):
    """A tensorrt-target export with its engine: generate and score equal the oracle."""
    from mtx import tensorrt as mtrt

    what = f"export {name} with --target tensorrt, build the engine and compare generate/score with transformers"
    if not torch.cuda.is_available():
        pytest.skip(f"no CUDA GPU: would {what}")
    ok, why = mtrt.available()
    if not ok:
        pytest.skip(f"{why}: would {what}")
    import mtx.runtime
    from mtx.exporter.core import export
    from mtx.exporter.options import ExportOptions

    folder = ckpt_factory(name)
    out = tmp_path / "trt"
    export(folder, out, ExportOptions(target="tensorrt", max_batch=4))
    gen = mtx.runtime.load(out, prefill_chunk=5)
    assert gen.backend.name == "tensorrt"
    assert gen.generate([PROMPTS[0]], max_new_tokens=30, stop_token_ids=[])[0] == hf_greedy(folder, PROMPTS[0], 30)
    ids = torch.randint(0, 128, (1, 37), generator=torch.Generator().manual_seed(11))
    assert np.abs(gen.score(ids[0].tolist()) - hf_logits(folder, ids)[0].numpy()).max() <= 1e-4
    together = gen.generate(PROMPTS, max_new_tokens=12, stop_token_ids=[])
    assert together == [gen.generate([p], max_new_tokens=12, stop_token_ids=[])[0] for p in PROMPTS]


def test_token_rng_is_splitmix64():
    """TokenRng's stream is SplitMix64 (Vigna's reference outputs for state 1234567), and draws from it
    pick tokens by inverse CDF in id order, as the C++ runtime does."""
    from mtx.runtime.sampling import SamplingParams, TokenRng, select_token

    rng = TokenRng(0)
    rng.state = 1234567
    assert [rng.next_u64() for _ in range(5)] == [6457827717110365317, 3203168211198807973, 9817491932198370423,
                                                  4593380528125082431, 16408922859458223821]
    logits = np.log(np.asarray([0.5, 0.0, 0.25, 0.25], dtype=np.float32) + 1e-30)
    draws, picks = TokenRng(7), []
    for _ in range(200):
        u = TokenRng(7, stream=0)
        u.state = draws.state
        expect = int(np.searchsorted(np.cumsum([0.5, 0.0, 0.25, 0.25]), u.uniform(), side="right"))
        picks.append((select_token(logits, SamplingParams(temperature=1.0), draws), expect))
    assert all(a == b for a, b in picks)
    assert {a for a, _ in picks} == {0, 2, 3}


def python_without_torch(code: str, *args: str) -> None:
    """Run ``code`` in a fresh interpreter, then assert that torch was never imported there."""
    check = "; assert 'torch' not in sys.modules, sorted(m for m in sys.modules if m.startswith('mtx'))"
    res = subprocess.run([sys.executable, "-c", "import sys; " + code + check, *args], capture_output=True,
                         text=True, timeout=300, env=mtx_env())
    assert res.returncode == 0, res.stderr


def test_backend_and_ort_backend_import_without_torch():
    """The abstract Backend and the ONNX Runtime backend need no torch (TorchBackend is its own module)."""
    python_without_torch("import mtx.runtime.backends, mtx.runtime.ort_backend")


def test_load_and_generate_an_onnx_export_without_torch(ckpt_factory, artifacts):
    """mtx.load of an onnxruntime-target export and a generate call never import torch."""
    out = artifacts(ckpt_factory("mistral"), "onnxruntime", None)
    python_without_torch("import mtx; gen = mtx.load(sys.argv[1]); assert gen.backend.name == 'onnxruntime'; "
                         "(ids,) = gen.generate([[5, 17, 99]], max_new_tokens=2, stop_token_ids=[]); "
                         "assert len(ids) == 2", str(out))

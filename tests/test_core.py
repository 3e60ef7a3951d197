"""The generation core: rows that share a graph call equal rows run alone, and one request's failure
(a poisoned option, a graph call that raises, NaN logits) ends that request alone.

References: each backend run row by row (the graph contract of docs/ops.md §1 on a batch of one), and
``Generator.generate([prompt])`` of each request run alone.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest

BACKENDS = {"torch": None, "onnxruntime": "onnxruntime", "onnx": "onnx"}


@pytest.fixture(scope="module", params=list(BACKENDS))
def gen(request, ckpt_factory, parity_export):
    import mtx.runtime

    folder = ckpt_factory("mistral")  # window 8, capacity 8
    target = BACKENDS[request.param]
    if target is None:
        return mtx.runtime.load(folder, backend="torch", max_batch=8, prefill_chunk=5)
    return mtx.runtime.load(parity_export("mistral", target), max_batch=8, prefill_chunk=5)


def test_rows_sharing_a_call_equal_rows_alone_bit_for_bit(gen):
    """Prefill chunks of 4 rows in one call (at position 0, then at ragged positions where the backend
    allows it) give exactly the logits of each row fed alone."""
    be = gen.backend
    rng = np.random.default_rng(0)
    V = gen.config.vocab_size
    prompts = rng.integers(3, V, size=(4, 6))
    history = [0, 3, 11, 20]  # tokens already in each row before the shared call (wraps capacity 8)
    past = [rng.integers(3, V, size=h) for h in history]
    alone = []
    for r in range(4):
        st = be.new_state(1)
        if history[r]:
            be.run(st, slice(0, 1), past[r][None], np.asarray([0]), last_only=True)
        alone.append(be.run(st, slice(0, 1), prompts[r:r + 1], np.asarray([history[r]]), last_only=False)[0])
    st = be.new_state(4)
    first = be.run(st, slice(0, 4), prompts, np.zeros(4, dtype=np.int64), last_only=False)
    fresh = [be.new_state(1) for _ in range(4)]
    for r in range(4):
        np.testing.assert_array_equal(first[r], be.run(fresh[r], slice(0, 1), prompts[r:r + 1], np.asarray([0]),
                                                       last_only=False)[0])
    step = rng.integers(3, V, size=(4, 1))  # then a decode call of the 4 rows together
    decoded = be.run(st, slice(0, 4), step, np.full(4, 6, dtype=np.int64), last_only=True)
    for r in range(4):
        np.testing.assert_array_equal(decoded[r], be.run(fresh[r], slice(0, 1), step[r:r + 1], np.asarray([6]),
                                                         last_only=True)[0])
    if be.multi_token_batch == "first_call_only":
        pytest.skip("rest: ragged multi-token calls are not allowed by this target (kv.multi_token_batch)")
    st = be.new_state(4)
    for r in range(4):
        if history[r]:
            be.run(st, slice(r, r + 1), past[r][None], np.asarray([0]), last_only=True)
    shared = be.run(st, slice(0, 4), prompts, np.asarray(history), last_only=False)
    for r in range(4):
        np.testing.assert_array_equal(shared[r], alone[r])


def test_offline_batch_shares_calls_and_equals_each_prompt_alone(gen):
    """generate() on 5 prompts (equal lengths share prefill calls) gives each prompt's tokens run alone."""
    rng = random.Random(1)
    prompts = [[rng.randrange(3, gen.config.vocab_size) for _ in range(7)] for _ in range(4)] + [[5, 9, 11]]
    calls = []
    run = gen.backend.run
    gen.backend.run = lambda state, rows, ids, pos, last_only: (calls.append(ids.shape), run(state, rows, ids, pos,
                                                                                          last_only))[1]
    try:
        together = gen.generate(prompts, max_new_tokens=12, stop_token_ids=[])
    finally:
        del gen.backend.run
    assert (4, 5) in calls  # the four 7-token prompts' first chunks went in one call
    for p, toks in zip(prompts, together):
        assert toks == gen.generate([p], max_new_tokens=12, stop_token_ids=[])[0]


class _Proxy:
    """A backend that forwards everything to ``backend``; subclasses change ``run``."""

    def __init__(self, backend: Any) -> None:
        self._backend = backend

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)


class _Faulty(_Proxy):
    """A backend proxy: a call whose input holds token ``magic`` raises (``mode="raise"``) or gives NaN
    logits for the rows holding it (``mode="nan"``)."""

    def __init__(self, backend: Any, magic: int, mode: str) -> None:
        super().__init__(backend)
        self._magic, self._mode = magic, mode

    def run(self, state: Any, rows: slice, ids: np.ndarray, pos: np.ndarray, last_only: bool) -> np.ndarray:
        hit = (ids == self._magic).any(axis=1)
        if hit.any() and self._mode == "raise":
            raise RuntimeError("injected failure")
        out = self._backend.run(state, rows, ids, pos, last_only)
        out[hit] = np.nan
        return out


@pytest.mark.parametrize("mode,shared", [("raise", False), ("raise", True), ("nan", True)])
def test_a_failing_request_ends_alone(gen, mode, shared):
    """8 requests through the engine, one of which makes its graph call raise (or its logits NaN): it
    finishes with "error" and every request outside its call gives its offline tokens. A call shared
    with others is retried row by row where the backend's calls can be rerun (``rerun_safe``: ring
    buffers); on ONNX Runtime's ``ort_window`` cache, which a repeated call would shift again, every
    member of the failed call ends with "error" instead."""
    from mtx.runtime import Generator
    from mtx.serving import Engine

    rng = random.Random(2)
    prompts = [[rng.randrange(3, gen.config.vocab_size) for _ in range(5)] for _ in range(8)]
    if not shared:
        prompts[3] = prompts[3][:4]  # a length of its own: its prefill call holds it alone
    expect = {i: gen.generate([p], max_new_tokens=10, stop_token_ids=[])[0] for i, p in enumerate(prompts) if i != 3}
    used = {t for seq in [*prompts, *expect.values()] for t in seq}
    magic = next(t for t in range(3, gen.config.vocab_size) if t not in used)  # only request 3 will hold it
    prompts[3][2] = magic
    faulty = Generator(_Faulty(gen.backend, magic, mode), gen.tokenizer, prefill_chunk=gen.prefill_chunk)
    with Engine(faulty, max_batch=8) as engine:
        handles = [engine.submit(p, max_tokens=10, stop_token_ids=[]) for p in prompts]
        results = {}
        for i, h in enumerate(handles):
            try:
                results[i] = h.result().tokens
            except RuntimeError as e:
                results[i] = str(e)
    assert "injected failure" in results[3] or "NaN" in results[3]
    whole_call_fails = mode == "raise" and shared and not gen.backend.rerun_safe
    for i, e in expect.items():
        if whole_call_fails:
            assert "injected failure" in results[i], f"request {i}"
        else:
            assert results[i] == e, f"request {i}"


def test_a_failed_call_is_not_rerun_on_a_cache_it_already_moved(gen):
    """A decode call that ran and then failed (say, fetching its logits) must not be repeated where the
    repeat is not the same call (ONNX Runtime's ort_window cache): its rows end with "error" rather than
    continue with shifted keys. Where it is rerun, the rows give their offline tokens."""
    from mtx.runtime import Generator
    from mtx.serving import Engine

    class FailAfterRun(_Proxy):
        def run(self, state, rows, ids, pos, last_only):
            out = self._backend.run(state, rows, ids, pos, last_only)
            if ids.shape == (2, 1) and int(pos.min()) >= 40 and not getattr(self, "failed", False):
                self.failed = True
                raise RuntimeError("injected failure after the call ran")
            return out

    prompts = [[5, 17, 99, 3], [64, 3, 77, 12]]
    expect = [gen.generate([p], max_new_tokens=60, stop_token_ids=[])[0] for p in prompts]
    faulty = Generator(FailAfterRun(gen.backend), gen.tokenizer, prefill_chunk=gen.prefill_chunk)
    with Engine(faulty, max_batch=2) as engine:
        handles = [engine.submit(p, max_tokens=60, stop_token_ids=[]) for p in prompts]
        got = []
        for h in handles:
            try:
                got.append(h.result().tokens)
            except RuntimeError as e:
                got.append(str(e))
    if gen.backend.rerun_safe:
        assert got == expect
    else:
        assert all("injected failure" in g for g in got)


def test_poisoned_sampling_options_stay_in_the_vocabulary_and_alone(gen):
    """A temperature of 1e-310 or a repetition penalty of 1e-320 once gave NaN probabilities and token id
    == vocab size, which broke every row's next call. Now they sample valid ids and the other 6 requests
    of the batch give their offline tokens."""
    from mtx.serving import Engine

    rng = random.Random(3)
    V = gen.config.vocab_size
    prompts = [[rng.randrange(3, V) for _ in range(6)] for _ in range(8)]
    poison = {2: dict(temperature=1e-310, seed=1), 5: dict(temperature=0.8, repetition_penalty=1e-320, seed=2)}
    expect = {i: gen.generate([p], max_new_tokens=10, stop_token_ids=[])[0] for i, p in enumerate(prompts)
              if i not in poison}
    with Engine(gen, max_batch=8) as engine:
        handles = [engine.submit(p, max_tokens=10, stop_token_ids=[], **poison.get(i, {})) for i, p in enumerate(prompts)]
        results = [h.result() for h in handles]
    for i, res in enumerate(results):
        assert res.finish_reason == "length"
        assert all(0 <= t < V for t in res.tokens)
        if i in expect:
            assert res.tokens == expect[i]
    offline = gen.generate([prompts[2]], max_new_tokens=10, stop_token_ids=[], temperature=1e-310, seed=1)[0]
    assert offline == results[2].tokens
    assert offline == gen.generate([prompts[2]], max_new_tokens=10, stop_token_ids=[])[0]  # T -> 0 is greedy


def test_refused_append_leaves_the_session_as_it_was(gen):
    """A turn that would run past the model's positions is refused and changes nothing."""
    from mtx.errors import UsageError

    limit = gen.backend.position_limit()
    if limit is None:
        pytest.skip("this backend has no position limit (sliding window, no max_position)")
    s = gen.session()
    s.append([5, 6, 7])
    before = (list(s.tokens), s.position)
    with pytest.raises(UsageError):
        s.append([9] * limit)
    assert (s.tokens, s.position) == before
    assert s.generate(4, stop_token_ids=[]) == gen.generate([[5, 6, 7]], 4, stop_token_ids=[])[0]


def test_engine_survives_a_failing_sink_and_every_request_finishes(gen):
    """A sink that raises cancels its own request; the engine goes on and the others finish as offline."""
    from mtx.serving import Engine

    prompts = [[5, 17, 99], [64, 3, 77], [9, 9, 9]]
    expect = [gen.generate([p], max_new_tokens=6, stop_token_ids=[])[0] for p in prompts]

    def broken(event: Any) -> None:
        raise ValueError("consumer gone")

    with Engine(gen, max_batch=2) as engine:
        engine.submit([11, 12, 13], max_tokens=6, stop_token_ids=[], sink=broken)
        handles = [engine.submit(p, max_tokens=6, stop_token_ids=[]) for p in prompts]
        assert [h.result().tokens for h in handles] == expect
        assert engine.alive and engine.wait_idle(30)
        assert engine.stats().finished["cancelled"] == 1 and engine.stats().running == 0


def test_queue_limit_holds_while_a_step_runs(gen):
    """Requests handed to the core but not yet admitted still count against max_queue."""
    import threading

    from mtx.runtime import Generator
    from mtx.serving import Engine, EngineBusy

    gate = threading.Event()

    class Slow(_Proxy):
        def run(self, *a: Any, **k: Any) -> np.ndarray:
            gate.wait(10)
            return self._backend.run(*a, **k)

    slow = Generator(Slow(gen.backend), gen.tokenizer, prefill_chunk=gen.prefill_chunk)
    with Engine(slow, max_batch=1, max_queue=2) as engine:
        handles = [engine.submit([5, 6], max_tokens=3, stop_token_ids=[])]
        accepted = 1
        for _ in range(6):
            try:
                handles.append(engine.submit([5, 6], max_tokens=3, stop_token_ids=[]))
                accepted += 1
            except EngineBusy:
                pass
            assert engine.stats().waiting <= 2
        gate.set()
        assert accepted <= 3  # one in the row (or about to be) + at most max_queue waiting
        for h in handles:
            assert h.result().finish_reason == "length"


def test_one_prepared_request_submitted_twice_runs_twice(gen):
    """A Request object submitted twice is two requests, each with its own tokens and finish."""
    from mtx.serving import Engine

    req = gen.request([5, 17, 99], 6, stop_token_ids=[])
    expect = gen.generate([[5, 17, 99]], max_new_tokens=6, stop_token_ids=[])[0]
    with Engine(gen, max_batch=2) as engine:
        h1, h2 = engine.submit(req), engine.submit(req)
        assert h1.id != h2.id
        assert h1.result().tokens == expect and h2.result().tokens == expect


def test_bench_raises_when_a_request_fails(gen):
    """mtx bench reports nothing, rather than hanging or a figure, when a request fails."""
    from mtx.runtime import Generator
    from mtx.runtime.bench import run_bench

    class NaNs(_Proxy):
        def run(self, *a: Any, **k: Any) -> np.ndarray:
            return self._backend.run(*a, **k) * np.nan

    with pytest.raises(ValueError, match="NaN"):
        run_bench(Generator(NaNs(gen.backend), gen.tokenizer), batch=2, prompt_len=4, new_tokens=4, warmup=0)

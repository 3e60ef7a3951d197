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


class _Faulty:
    """A backend proxy: a call whose input holds token ``magic`` raises (``mode="raise"``) or gives NaN
    logits for the rows holding it (``mode="nan"``)."""

    def __init__(self, backend: Any, magic: int, mode: str) -> None:
        self._backend, self._magic, self._mode = backend, magic, mode

    def __getattr__(self, name: str) -> Any:
        return getattr(self._backend, name)

    def run(self, state: Any, rows: slice, ids: np.ndarray, pos: np.ndarray, last_only: bool) -> np.ndarray:
        hit = (ids == self._magic).any(axis=1)
        if hit.any() and self._mode == "raise":
            raise RuntimeError("injected failure")
        out = self._backend.run(state, rows, ids, pos, last_only)
        out[hit] = np.nan
        return out


@pytest.mark.parametrize("mode", ["raise", "nan"])
def test_a_failing_request_ends_alone(gen, mode):
    """8 requests through the engine, one of which makes its graph call raise (or its logits NaN): it
    finishes with "error", the other 7 give their offline tokens."""
    from mtx.runtime import Generator
    from mtx.serving import Engine

    rng = random.Random(2)
    prompts = [[rng.randrange(3, gen.config.vocab_size) for _ in range(5)] for _ in range(8)]
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
    for i, e in expect.items():
        assert results[i] == e, f"request {i}"


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

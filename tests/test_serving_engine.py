"""The continuous-batching engine against Generator.generate run alone (the offline reference)."""

from __future__ import annotations

import random
import threading

import pytest

from mtx.errors import UsageError

#: engine backend -> export target (None: the checkpoint through the PyTorch reference; "onnx": mtx function
#: bodies in ONNX Runtime with separate past/present buffers, each row tracking its own buffer set).
BACKENDS = {"torch": None, "onnxruntime": "onnxruntime", "onnx": "onnx"}


@pytest.fixture(scope="module", params=list(BACKENDS))
def gen(request, ckpt_factory, parity_export):
    import mtx.runtime

    folder = ckpt_factory("mistral")  # window 8, capacity 8: prompts and outputs wrap the buffer
    target = BACKENDS[request.param]
    if target is None:
        return mtx.runtime.load(folder, backend="torch", max_batch=8, prefill_chunk=5)
    return mtx.runtime.load(parity_export("mistral", target), max_batch=8, prefill_chunk=5)


def make_requests(gen, n: int = 16, seed: int = 0) -> list[tuple[list[int], dict]]:
    """Prompts of 1..40 tokens and 0..30 new tokens; some greedy, some seeded sampling, some with a
    stop string taken from the offline output, one with a repetition penalty."""
    rng = random.Random(seed)
    reqs = []
    for i in range(n):
        prompt = [rng.randrange(3, gen.config.vocab_size) for _ in range(rng.randrange(1, 41))]
        kw: dict = dict(max_tokens=[0, 1, 2][i] if i < 3 else rng.randrange(5, 31), stop_token_ids=[])
        if i % 3 == 1:
            kw.update(temperature=0.9, top_k=40, top_p=0.9, seed=1000 + i)
        if i == 7:
            kw.update(repetition_penalty=1.3)
        if i % 4 == 3:  # stop at the word of the offline output's 4th token
            free = offline(gen, prompt, kw)
            kw["stop"] = [gen.decode([free[3]])]
        reqs.append((prompt, kw))
    return reqs


def offline(gen, prompt: list[int], kw: dict) -> list[int]:
    """The reference: Generator.generate for this prompt alone."""
    opts = {k: v for k, v in kw.items() if k != "max_tokens"}
    return gen.generate([prompt], max_new_tokens=kw["max_tokens"], **opts)[0]


class Collector:
    """Sinks of many requests: tokens per request, finish reasons, and a count of all tokens so far."""

    def __init__(self) -> None:
        self.tokens: dict[int, list[int]] = {}
        self.reasons: dict[int, str] = {}
        self.total = 0
        self.cond = threading.Condition()

    def sink(self, key: int):
        self.tokens[key] = []

        def put(ev) -> None:
            with self.cond:
                if ev.kind == "token":
                    self.tokens[key].append(ev.token)
                    self.total += 1
                else:
                    self.reasons[key] = ev.finish_reason
                self.cond.notify_all()
        return put

    def wait(self, pred, timeout: float = 60.0) -> None:
        with self.cond:
            assert self.cond.wait_for(pred, timeout), "engine made no progress"


def test_sixteen_requests_arriving_at_different_times_equal_offline(gen):
    """16 requests of different lengths, sampling options and stop strings, each submitted once the
    engine has produced 3 more tokens, through 4 rows with a 7-token step budget (prompts are
    chunked and interleaved with decoding; rows are reused): each gets exactly its offline tokens."""
    from mtx.serving import Engine

    reqs = make_requests(gen)
    expect = [offline(gen, p, kw) for p, kw in reqs]
    assert any(len(e) < kw["max_tokens"] for e, (_, kw) in zip(expect, reqs))  # some stop early
    col = Collector()
    with Engine(gen, max_batch=4, max_queue=16, token_budget=7) as engine:
        for i, (prompt, kw) in enumerate(reqs):
            col.wait(lambda: col.total >= 3 * i or len(col.reasons) == i)
            engine.submit(prompt, **kw, sink=col.sink(i))
        col.wait(lambda: len(col.reasons) == len(reqs))
        stats = engine.stats()
    for i, e in enumerate(expect):
        assert col.tokens[i] == e, f"request {i}: {reqs[i][1]}"
        stopped = len(e) < reqs[i][1]["max_tokens"]
        assert col.reasons[i] == ("stop" if stopped else "length")
    assert stats.running == 0 and stats.waiting == 0
    assert stats.finished["stop"] + stats.finished["length"] == 16


def test_cancel_frees_the_row_for_the_next_request(gen):
    """One row: a long request is cancelled mid-way; the queued request gets the row and, starting at
    position 0 over the cancelled one's stale slots, its offline tokens."""
    from mtx.serving import Engine

    long_prompt = list(range(3, 30))
    short_prompt = [5, 17, 99]
    expect = offline(gen, short_prompt, dict(max_tokens=12, stop_token_ids=[]))
    col = Collector()
    with Engine(gen, max_batch=1, max_queue=4) as engine:
        first = engine.submit(long_prompt, max_tokens=3000, stop_token_ids=[], sink=col.sink(0))
        col.wait(lambda: len(col.tokens[0]) >= 20)  # past two buffer wraps
        handle = engine.submit(short_prompt, max_tokens=12, stop_token_ids=[], sink=col.sink(1))
        assert engine.stats().waiting == 1
        first.cancel()
        col.wait(lambda: len(col.reasons) == 2)
        assert handle.finish_reason == "length"
        stats = engine.stats()
    assert col.reasons[0] == "cancelled"
    assert col.tokens[1] == expect
    assert stats.finished["cancelled"] == 1 and stats.running == 0


def test_queue_full_and_draining(gen):
    from mtx.serving import Engine, EngineBusy, EngineDraining

    engine = Engine(gen, max_batch=1, max_queue=2)  # not started: requests stay queued
    try:
        engine.submit([5, 6], max_tokens=2)
        engine.submit([5, 6], max_tokens=2)
        with pytest.raises(EngineBusy, match="queue is full"):
            engine.submit([5, 6], max_tokens=2)
        engine.begin_drain()
        with pytest.raises(EngineDraining):
            engine.submit([5, 6], max_tokens=2)
        engine.start()
        assert engine.wait_idle(60)  # the queued ones still run to the end
        assert engine.stats().finished["length"] == 2
    finally:
        engine.close()


@pytest.mark.parametrize("kw,needle", [
    (dict(prompt=[1, 2, 500]), "token id 500 is out of range"),
    (dict(prompt=[]), "empty"),
    (dict(prompt=[1], max_tokens=-1), "max_new_tokens must be an integer >= 0"),
    (dict(prompt=[1], temperature=-1.0), "temperature must be >= 0"),
    (dict(prompt=[1], seed=-3), "seed must be an integer"),
    (dict(prompt=[1], max_batch=99), "exceeds the maximum batch 8"),
])
def test_bad_requests(gen, kw, needle):
    from mtx.serving import Engine

    kw = dict(kw)
    prompt, max_batch = kw.pop("prompt"), kw.pop("max_batch", 2)
    with pytest.raises(UsageError, match=needle):
        Engine(gen, max_batch=max_batch).submit(prompt, **{"max_tokens": 4, **kw})


def test_plan_step_spans_and_budget():
    """Decode spans skip prefilling rows; the budget left after decode rows goes to prefill in admission order."""
    from mtx.runtime.scheduler import Phase, PrefillCall, RowView, plan_step

    I = RowView(Phase.IDLE)
    D = RowView(Phase.DECODE, position=9)

    def P(left: int, order: int, position: int = 0) -> RowView:
        return RowView(Phase.PREFILL, left, position, order)

    plan = plan_step([D, I, D, P(10, 0), I, D, I], token_budget=8, max_chunk=4)
    assert plan.decode_spans == [slice(0, 3), slice(5, 6)]
    assert plan.prefill == [PrefillCall(slice(3, 4), 4)]
    plan = plan_step([P(3, 1), D, D, P(9, 0)], token_budget=6, max_chunk=16)
    assert plan.decode_spans == [slice(1, 3)]
    # chunks are never cut by the budget (docs/ops.md §1 rule 7): the step's first chunk runs whole,
    # and the next one, which no longer fits, waits
    assert plan.prefill == [PrefillCall(slice(3, 4), 9)]
    plan = plan_step([D, D, P(9, 0)], token_budget=2, max_chunk=16)
    assert plan.prefill == [PrefillCall(slice(2, 3), 9)]  # a prompt progresses every step
    # canonical chunks end at multiples of max_chunk, wherever the row stands
    plan = plan_step([P(10, 0, position=3), P(10, 1, position=8), P(2, 2, position=13)], token_budget=100, max_chunk=4)
    assert plan.prefill == [PrefillCall(slice(0, 1), 1), PrefillCall(slice(1, 2), 4), PrefillCall(slice(2, 3), 2)]


def test_plan_step_groups_equal_chunks_into_one_call():
    """Contiguous rows with equal chunk lengths share a call; with first_call_only only rows at position 0 do."""
    from mtx.runtime.scheduler import Phase, PrefillCall, RowView, plan_step

    rows = [RowView(Phase.PREFILL, 5, 0, 0), RowView(Phase.PREFILL, 5, 0, 1), RowView(Phase.PREFILL, 9, 0, 2),
            RowView(Phase.PREFILL, 5, 0, 3)]
    plan = plan_step(rows, token_budget=100, max_chunk=16)
    assert plan.prefill == [PrefillCall(slice(0, 2), 5), PrefillCall(slice(2, 3), 9), PrefillCall(slice(3, 4), 5)]
    plan = plan_step(rows, token_budget=100, max_chunk=5)  # chunks of 5 everywhere: one call
    assert plan.prefill == [PrefillCall(slice(0, 4), 5)]
    later = [RowView(Phase.PREFILL, 5, 0, 0), RowView(Phase.PREFILL, 5, 7, 1)]
    assert plan_step(later, 100, 16).prefill == [PrefillCall(slice(0, 2), 5)]
    assert plan_step(later, 100, 16, first_call_only=True).prefill == [PrefillCall(slice(0, 1), 5),
                                                                          PrefillCall(slice(1, 2), 5)]
    one_token = [RowView(Phase.PREFILL, 1, 3, 0), RowView(Phase.PREFILL, 1, 7, 1)]
    assert plan_step(one_token, 100, 16, first_call_only=True).prefill == [PrefillCall(slice(0, 2), 1)]
    # the budget runs out in admission order: the oldest row (row 1) first; a chunk that does not fit waits
    plan = plan_step([RowView(Phase.PREFILL, 8, 0, 1), RowView(Phase.PREFILL, 8, 0, 0)], 10, 16)
    assert plan.prefill == [PrefillCall(slice(1, 2), 8)]
    plan = plan_step([RowView(Phase.PREFILL, 8, 0, 1), RowView(Phase.PREFILL, 8, 0, 0)], 16, 16)
    assert plan.prefill == [PrefillCall(slice(0, 2), 8)]


def test_decode_is_deferred_while_prompts_are_fed_up_to_the_limit():
    """A step with new prompts skips decode (the prompts get the whole budget) until max_deferred_tokens
    prompt tokens were fed while decode waited; without prompts to feed nothing is deferred."""
    from mtx.runtime.scheduler import Phase, PrefillCall, RowView, plan_step

    D = RowView(Phase.DECODE, position=9)
    rows = [D, D, RowView(Phase.PREFILL, 100, 0, 5)]
    plan = plan_step(rows, token_budget=10, max_chunk=8, deferred_tokens=0, max_deferred_tokens=20)
    assert plan.decode_spans == [] and plan.prefill == [PrefillCall(slice(2, 3), 8)]
    plan = plan_step(rows, token_budget=10, max_chunk=8, deferred_tokens=19, max_deferred_tokens=20)
    assert plan.decode_spans == []
    plan = plan_step(rows, token_budget=10, max_chunk=8, deferred_tokens=20, max_deferred_tokens=20)
    assert plan.decode_spans == [slice(0, 2)] and plan.prefill == [PrefillCall(slice(2, 3), 8)]
    # a VERIFY row (a decoding row with drafts) has its own call, costs its drafts and pending token,
    # breaks decode spans, and is deferred like decode
    V = RowView(Phase.VERIFY, position=9, drafts=3)
    plan = plan_step([D, V, D, RowView(Phase.PREFILL, 100, 0, 5)], token_budget=14, max_chunk=8,
                     deferred_tokens=20, max_deferred_tokens=20)
    assert plan.decode_spans == [slice(0, 1), slice(2, 3)] and plan.verify == [1]
    assert plan.prefill == [PrefillCall(slice(3, 4), 8)]
    plan = plan_step([D, V, RowView(Phase.PREFILL, 100, 0, 5)], 14, 8, deferred_tokens=0, max_deferred_tokens=20)
    assert plan.verify == [] and plan.decode_spans == []
    assert plan_step([D, D], 10, 64, deferred_tokens=0, max_deferred_tokens=20).decode_spans == [slice(0, 2)]
    assert plan_step(rows, 10, 64, deferred_tokens=0, max_deferred_tokens=0).decode_spans == [slice(0, 2)]


def test_engine_with_decode_deferral_gives_offline_tokens(gen):
    """Deferral changes when rows decode, never what they decode."""
    from mtx.serving import Engine

    reqs = make_requests(gen, n=8, seed=5)
    expect = [offline(gen, p, kw) for p, kw in reqs]
    with Engine(gen, max_batch=4, token_budget=6, max_deferred_tokens=15) as engine:
        handles = [engine.submit(p, **kw) for p, kw in reqs]
        got = [h.result().tokens for h in handles]
    assert got == expect


def test_admission_and_finishing_decisions():
    from mtx.runtime.scheduler import admit, finish_reason

    assert admit([5, 1, 3], 2) == [1, 3] and admit([2], 4) == [2] and admit([], 3) == []
    assert finish_reason(3, 10, stopped=True) == "stop"
    assert finish_reason(10, 10, stopped=True) == "stop"
    assert finish_reason(10, 10, stopped=False) == "length"
    assert finish_reason(4, 10, stopped=False) is None


def test_cancelled_waiting_requests_free_their_queue_slots(gen):
    """A client that gives up while queued frees its slot at once, even with every row busy."""
    from mtx.serving import Engine

    engine = Engine(gen, max_batch=1, max_queue=2)  # not started: every request stays queued
    try:
        first = engine.submit([5, 6], max_tokens=2)
        engine.submit([5, 6], max_tokens=2)
        first.cancel()
        engine.submit([7, 8], max_tokens=2)  # takes the cancelled request's slot: no EngineBusy
        assert engine.stats().waiting == 2
        assert first.result().finish_reason == "cancelled"
        engine.start()
        assert engine.wait_idle(60)
        assert engine.stats().finished == {**engine.stats().finished, "length": 2, "cancelled": 1}
    finally:
        engine.close()

"""Prefix caching and speculative decoding on the rolling buffer (docs/ops.md §1 rules 10-12).

References: the same backend prefilling the whole prompt from position 0 in canonical chunks
(:func:`mtx.runtime.core.feed`, the graph contract run row by row), and plain decoding (one token per
call) of the same request. Capacities 8 (= W) and 12 (> W) on window 8 exercise both KV layouts past
their capacity: ``ring`` (slot p mod C) and ONNX Runtime's ``ort_window``.
"""

from __future__ import annotations

import random

import numpy as np
import pytest

import mtx.runtime
from mtx.runtime import speculative
from mtx.runtime.core import feed, store_prompt_block
from mtx.runtime.prefix_cache import PrefixCache, chain_digests

TARGETS = ("torch", "onnxruntime", "onnx")


def _load(ckpt_factory, parity_export, variant: str, target: str, capacity: int | None, **kw):
    options = {} if capacity is None else {"cache_capacity": capacity}
    if target == "torch" and variant.endswith("full"):
        options["cache_capacity"] = 64  # as parity_export sizes full attention, not the 4096 positions
    if target == "torch":
        return mtx.runtime.load(ckpt_factory(variant), backend="torch", capacity=options.get("cache_capacity"), **kw)
    return mtx.runtime.load(parity_export(variant, target, **options), **kw)


def _garbage_state(be, rng):
    """A one-row state whose buffers hold large random values: slots a seeded row must never read."""
    st = be.new_state(1)
    for buf in be.row_buffers(st, 0):
        noise = rng.normal(0, 50, size=tuple(buf.shape)).astype(np.float32)
        if isinstance(buf, np.ndarray):
            buf[...] = noise
        else:
            import torch

            buf.copy_(torch.from_numpy(noise).to(buf.dtype))
    return st


CASES = [  # (variant, capacity, block P): window 8 (or full attention, capacity 64)
    ("mistral", 8, 4),
    ("mistral", 12, 2),
    ("mistral", 12, 3),
    ("mistral_full", None, 4),
    ("mixtral4", 12, 2),
]


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("variant,capacity,block", CASES)
def test_prefix_seeded_rows_equal_rows_prefilled_from_scratch_bit_for_bit(ckpt_factory, parity_export, target, variant,
                                                                         capacity, block):
    """A row seeded from cached blocks at p and fed the rest gives the logits of the prompt prefilled from
    0, bit for bit (float32), then the same decode logits: for p below W, equal to W, between W and C,
    equal to C and past C (several buffer wraps), on buffers full of garbage."""
    gen = _load(ckpt_factory, parity_export, variant, target, capacity, prefill_chunk=block, prefix_cache_bytes=0)
    be = gen.backend
    C, W = be.capacity, be.window or be.capacity
    rng = np.random.default_rng(7)
    V = gen.config.vocab_size
    shared_lengths = sorted({3, 8, 10, 13, 31} if be.window else {4, 8, 20})
    for L in shared_lengths:
        prompt = [int(t) for t in rng.integers(3, V, size=L + 5)]
        donor = prompt[:L] + [int(t) for t in rng.integers(3, V, size=6)]
        cache = PrefixCache(1 << 30, block, be.window, C)
        st = be.new_state(1)
        digests = chain_digests(donor, block)
        feed(be, st, 0, donor, 0, block, False,
             lambda end: store_prompt_block(cache, be, st, 0, donor, digests, end))
        hit = cache.lookup(prompt)
        expect = (min(L, len(prompt) - 1) // block) * block
        assert (hit.position if hit else 0) == expect, (L, expect)
        if hit is None:
            continue
        assert hit.first == max(0, hit.position - W) and hit.keys.shape[2] == hit.position - hit.first
        scratch = be.new_state(1)
        want = feed(be, scratch, 0, prompt, 0, block, True)
        seeded = _garbage_state(be, rng)
        be.write_positions(seeded, 0, hit.position, hit.first, hit.keys, hit.values)
        got = feed(be, seeded, 0, prompt[hit.position:], hit.position, block, True)
        np.testing.assert_array_equal(got, want[hit.position:], err_msg=f"L={L} p={hit.position} C={C} W={W}")
        pos = len(prompt)
        for tok in rng.integers(3, V, size=C + 3 if L == shared_lengths[-1] else 3):  # the longest: past a wrap
            a = be.run(seeded, slice(0, 1), np.asarray([[tok]]), np.asarray([pos]), True)
            b = be.run(scratch, slice(0, 1), np.asarray([[tok]]), np.asarray([pos]), True)
            np.testing.assert_array_equal(a, b)
            pos += 1
            if not be.window and pos >= C:
                break


@pytest.mark.parametrize("target", TARGETS)
def test_generate_with_the_cache_equals_generate_without_it(ckpt_factory, parity_export, target):
    """Multi-turn conversations and a shared system prompt through Generator.generate (the core): the
    same tokens with the prefix cache as without it, with hits and tokens reused; under a cache of two
    blocks (constant eviction) the answers do not change either."""
    kw = dict(prefill_chunk=4)
    plain = _load(ckpt_factory, parity_export, "mistral", target, 12, prefix_cache_bytes=0, **kw)
    cached = _load(ckpt_factory, parity_export, "mistral", target, 12, prefix_cache_bytes=64 << 20, **kw)
    block_bytes = 2 * cached.config.num_layers * cached.config.num_kv_heads * 4 * cached.config.head_dim * 4
    tiny = _load(ckpt_factory, parity_export, "mistral", target, 12, prefix_cache_bytes=2 * block_bytes, **kw)
    rnd = random.Random(3)
    V = plain.config.vocab_size
    system = [rnd.randrange(3, V) for _ in range(21)]
    convo = list(system)
    for turn in range(4):
        convo += [rnd.randrange(3, V) for _ in range(5)]
        prompts = [convo, system + [rnd.randrange(3, V) for _ in range(3 + turn)]]
        opts = dict(max_new_tokens=6, stop_token_ids=[], temperature=0.7, seed=11 + turn)
        want = plain.generate(prompts, **opts)
        assert cached.generate(prompts, **opts) == want
        assert tiny.generate(prompts, **opts) == want
        convo += want[0]
    stats = cached.prefix_cache.stats
    assert stats.hits >= 6 and stats.tokens_reused >= 6 * 20
    small = tiny.prefix_cache.stats
    assert small.blocks_evicted > 0 and small.bytes <= 2 * block_bytes
    assert small.hits > 0  # a chain loses its tail first: its head still gives hits under eviction


def test_session_starts_from_a_cached_prefix_and_from_a_saved_state(ckpt_factory, parity_export):
    """A fresh session's first turn uses the generator's cache; a session made from another session's
    prefix_state() continues as that session would (bit for bit: it saw the same calls)."""
    from mtx.errors import UsageError

    gen = _load(ckpt_factory, parity_export, "mistral", "onnxruntime", 12, prefill_chunk=4,
                prefix_cache_bytes=64 << 20)
    off = _load(ckpt_factory, parity_export, "mistral", "onnxruntime", 12, prefill_chunk=4, prefix_cache_bytes=0)
    rnd = random.Random(5)
    prompt = [rnd.randrange(3, gen.config.vocab_size) for _ in range(30)]
    gen.session().append(prompt)
    np.testing.assert_array_equal(gen.session().append(prompt + [7, 9]), off.session().append(prompt + [7, 9]))
    assert gen.prefix_cache.stats.hits == 1 and gen.prefix_cache.stats.tokens_reused == 28
    for n in (3, 8, 10, 12, 30):  # below W, W, between W and C, C, past C
        first = off.session()
        first.append(prompt[:n])
        resumed = off.session(prefix=first.prefix_state())
        assert resumed.position == n and resumed.tokens == prompt[:n]
        with pytest.raises(UsageError, match="append a turn"):
            resumed.generate(3)
        np.testing.assert_array_equal(resumed.append([5, 6, 7]), first.append([5, 6, 7]))
        assert resumed.generate(14, stop_token_ids=[]) == first.generate(14, stop_token_ids=[])


def _repetitive_prompts(V: int, seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    motif = [rnd.randrange(3, V) for _ in range(6)]
    noisy = [rnd.randrange(3, V) for _ in range(9)]
    return [motif * 3 + motif[:2], noisy + motif + noisy[:4], [rnd.randrange(3, V) for _ in range(11)]]


@pytest.mark.parametrize("target,capacity", [(t, c) for t in TARGETS for c in (8, 12, 16)
                                             if t != "torch" or c == 12])  # the reference: one capacity (slow)
def test_speculative_tokens_equal_plain_decoding(ckpt_factory, parity_export, monkeypatch, target, capacity):
    """Greedy and seeded prompt-lookup decoding give plain decoding's tokens over >= 3 buffer wraps,
    with accepted drafts and rejected ones, some of them across a wrap (capacity 8: restore on ring and
    ort_window; 12: partial; 16 >= W + k for k <= 7: rollback without restore on ring)."""
    gen = _load(ckpt_factory, parity_export, "mistral", target, capacity, prefill_chunk=4, prefix_cache_bytes=0)
    calls = []
    real = speculative.rollback
    monkeypatch.setattr(speculative, "rollback",
                        lambda be, st, row, v, a: (calls.append((v.start, v.drafts, a)), real(be, st, row, v, a))[1])
    prompts = _repetitive_prompts(gen.config.vocab_size, capacity)
    n = 3 * capacity + 6
    for opts in (dict(), dict(temperature=0.9, top_k=20, seed=5), dict(temperature=1.3, seed=9)):
        want = gen.generate(prompts, max_new_tokens=n, stop_token_ids=[], **opts)
        for k in (1, 4):
            got = gen.generate(prompts, max_new_tokens=n, stop_token_ids=[],
                               speculative={"method": "ngram", "num_tokens": k}, **opts)
            assert got == want, (opts, k)
        s = gen.session()
        s.append(prompts[0])
        assert s.generate(n, stop_token_ids=[], speculative=4, **opts) == want[0]
        assert s.spec_stats.verifications > 0
    rejected = [(start, d, a) for start, d, a in calls if a < d]
    assert rejected, "no draft was rejected: the test does not exercise rollback"
    assert any(start // capacity != (start + d) // capacity for start, d, a in rejected), "no rejection across a wrap"


def copy_workload(gen, prefix: list[int], n: int) -> tuple[list[int], list[int]]:
    """A prompt whose answer copies a span of it: ``prefix`` (at least L(W-1)+1 tokens, the receptive field
    of L layers of window W), the model's own greedy continuation ``out`` of it, then ``prefix`` again. The model then sees the same last tokens after
    the second ``prefix`` (RoPE is relative), so it answers ``out`` again, which prompt lookup finds in
    the prompt. Returns (prompt, out)."""
    out = gen.generate([prefix], n, stop_token_ids=[])[0]
    return prefix + out + prefix, out


def test_speculative_decoding_accepts_copied_spans_and_backs_off(ckpt_factory, parity_export):
    """On an answer that copies its prompt, drafts are accepted and calls saved; on random prompts,
    drafting backs off after failures (few verification calls)."""
    gen = _load(ckpt_factory, parity_export, "mistral", "onnxruntime", 12, prefill_chunk=4, prefix_cache_bytes=0)
    rnd = random.Random(2)
    prompt, out = copy_workload(gen, [rnd.randrange(3, gen.config.vocab_size) for _ in range(16)], 30)
    core = gen.core(1)
    core.add(gen.request(prompt, 30, stop_token_ids=[], speculative=4))
    tokens = []
    while core.has_unfinished():
        tokens += [o.token for o in core.step() if o.token is not None]
    st = core.spec_stats
    assert tokens == gen.generate([prompt], 30, stop_token_ids=[])[0]
    assert st.accepted >= 15 and st.accepted / st.drafted > 0.6, st
    assert core.steps <= -(-len(prompt) // 4) + 30 - st.accepted  # prefill steps, then each accepted draft saved one
    # a stop token inside an accepted span: the request ends within its drafts, as plain decoding ends
    stop = [out[12]]
    want = gen.generate([prompt], 30, stop_token_ids=stop)[0]
    assert want[-1] == out[12] and len(want) < 30
    assert gen.generate([prompt], 30, stop_token_ids=stop, speculative=5)[0] == want
    s = gen.session()
    s.append(prompt)
    assert s.generate(30, stop_token_ids=stop, speculative=5) == want and s.spec_stats.accepted > 0
    assert s.generate(6, stop_token_ids=[]) == gen.generate([prompt + want], 6, stop_token_ids=[])[0]
    core = gen.core(1)
    core.add(gen.request([rnd.randrange(3, gen.config.vocab_size) for _ in range(10)], 60, stop_token_ids=[],
                         speculative=4, temperature=1.0, seed=3))
    while core.has_unfinished():
        core.step()
    assert core.spec_stats.verifications <= 12, core.spec_stats  # back-off: 2, 4, 8, ... steps without drafts


def test_speculative_options_are_checked(ckpt_factory, parity_export):
    from mtx.errors import UsageError

    gen = _load(ckpt_factory, parity_export, "mistral", "onnxruntime", 8, prefill_chunk=4, prefix_cache_bytes=0)
    for bad, field in [({"method": "eagle"}, "method"), ({"num_tokens": 0}, "num_tokens"), ({"num_tokens": 8}, "num_tokens"),
                       ({"num_tokens": "3"}, "num_tokens"), ({"bogus": 1}, "bogus"), ("fast", "speculative"),
                       ({"prompt_lookup_min": 3, "prompt_lookup_max": 2}, "prompt_lookup_min")]:
        with pytest.raises(UsageError, match=field):
            gen.request([5, 6, 7], 4, speculative=bad)
    gen.request([5, 6, 7], 4, speculative={"method": "ngram", "num_speculative_tokens": 7})  # vLLM's name; W - 1


def test_server_prefix_cache_and_speculative_fields(parity_export):
    """`mtx serve` with --prefill-chunk 4: a repeated prompt hits the cache, a copying answer accepts drafts
    (the `speculative` field, vLLM's names), texts equal offline plain decoding, /metrics counts both, and
    a bad `speculative` is a 400 naming the field."""
    import openai

    from tests.test_serving_http import Server

    export = parity_export("mistral", "onnxruntime")
    gen = mtx.runtime.load(export, prefill_chunk=4, prefix_cache_bytes=0)
    rnd = random.Random(4)
    prompt, _ = copy_workload(gen, [rnd.randrange(3, gen.config.vocab_size) for _ in range(16)], 24)
    want = gen.decode(gen.generate([prompt], 24, stop_token_ids=[])[0])
    s = Server(export, "--prefill-chunk", "4", "--prefix-cache-bytes", "10000000")
    try:
        client = s.client()
        for spec in (None, {"method": "ngram", "num_speculative_tokens": 4}, {"num_tokens": 2, "prompt_lookup_max": 2}):
            extra = {"ignore_eos": True} | ({"speculative": spec} if spec else {})
            r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0, extra_body=extra)
            assert r.choices[0].text == want, spec
        m = s.metrics()
        assert m["mtx_prefix_cache_hits_total"] >= 2 and m["mtx_prefix_cache_tokens_reused_total"] == 2 * 52  # blocks of 4 up to position 55
        assert m["mtx_prefix_cache_bytes"] > 0
        assert m["mtx_spec_decode_accepted_tokens_total"] > 10
        assert 0 < m["mtx_spec_decode_acceptance_rate"] <= 1
        with pytest.raises(openai.BadRequestError) as e:
            client.completions.create(model="tiny", prompt=prompt, max_tokens=4,
                                      extra_body={"speculative": {"method": "medusa"}})
        assert "speculative" in str(e.value)
    finally:
        s.stop()


def test_cli_generate_speculative_equals_plain(run_mtx, parity_export):
    """`mtx generate --speculative-ngram K --json`: the ids of plain decoding, with its counters; K beyond
    the window minus one is one line, exit 2."""
    import json

    export = parity_export("mistral", "onnxruntime")
    ids = ",".join(str(t) for t in [5, 6, 7, 8, 9, 10, 11, 12] * 3)
    plain = json.loads(run_mtx("generate", export, "--ids", ids, "--max-new-tokens", "24", "--json").stdout)
    spec = json.loads(run_mtx("generate", export, "--ids", ids, "--max-new-tokens", "24", "--json",
                              "--speculative-ngram", "3").stdout)
    assert spec["ids"] == plain["ids"] and spec["speculative"]["verifications"] >= 1
    r = run_mtx("generate", export, "--ids", ids, "--speculative-ngram", "8")
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "num_tokens 8 exceeds 7" in r.stderr


def _write_tokens(buf: list, used: int, layout: str, C: int, W: int, positions: range, label) -> int:
    """An independent model of both layouts, token by token: ``ring`` writes position q to slot q mod C;
    ``ort_window`` (ONNX Runtime's windowed cache as measured, tests/test_cpp.py) appends to the next row
    and, when the buffer is full, first moves its last W - 1 rows to the front. Returns the rows in use."""
    for q in positions:
        if layout == "ring":
            buf[q % C] = label(q)
            continue
        if used == C:
            buf[0:W - 1] = buf[C - W + 1:C]
            used = W - 1
        buf[used] = label(q)
        used += 1
    return used


def test_rollback_arithmetic_against_a_model_of_both_layouts():
    """For every capacity up to 11, window, draft count, start and acceptance: the positions saved before a
    verification and the restores and moves after it (mtx.rolling_kv) leave every live position of the
    new position where slot_at says, with its own key; nothing is saved on ring when C >= W + k."""
    from mtx import rolling_kv as rk

    for layout in ("ring", "ort_window"):
        for C in range(1, 12):
            for W in range(1, C + 1):
                for window in ({W, None} if W == C else {W}):
                    Weff = rk.effective_window(window, C)
                    for k in range(1, Weff):
                        for start in range(0, 3 * C + 5):
                            if window is None and start + k + 1 > C:
                                continue
                            for a in range(0, k + 1):
                                buf: list = [None] * C
                                used = _write_tokens(buf, 0, layout, C, Weff, range(start), lambda q: q)
                                for q in rk.live_positions(start, window, C):
                                    assert buf[rk.slot_at(layout, q, start, window, C)] == q
                                saves = rk.verify_saves(layout, start, k, window, C)
                                assert len(saves) <= k
                                if layout == "ring" and window is not None and C >= Weff + k:
                                    assert not len(saves)
                                saved = {q: buf[rk.slot_at(layout, q, start, window, C)] for q in saves}
                                new, end = start + a + 1, start + k + 1
                                _write_tokens(buf, used, layout, C, Weff, range(start, end),
                                              lambda q: q if q < new else -1000 - q)  # rejected drafts
                                restore, moved = rk.rollback_moves(layout, start, k, a, window, C)
                                vals = [buf[rk.slot_at(layout, q, end, window, C)] for q in moved]
                                for q, v in zip(moved, vals):
                                    buf[rk.slot_at(layout, q, new, window, C)] = v
                                for q in restore:
                                    buf[rk.slot_at(layout, q, new, window, C)] = saved[q]
                                for q in rk.live_positions(new, window, C):
                                    slot = rk.slot_at(layout, q, new, window, C)
                                    assert 0 <= slot < C and buf[slot] == q, (layout, C, W, window, k, start, a, q)

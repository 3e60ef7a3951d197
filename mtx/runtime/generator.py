"""Generation over any backend: the offline front end (``generate``/``stream``) and sessions.

Invariants:
* ``generate``/``stream`` run a :class:`~mtx.runtime.core.BatchCore` of one row per prompt: requests are
  prepared once (:func:`~mtx.runtime.request.prepare_request`), prompts of several rows are prefilled
  together where the graph allows, and every token comes from the one sampling step
  (:class:`~mtx.runtime.row_decoder.RowDecoder`). Row ``r`` of a batch samples with ``TokenRng`` stream ``r``.
* KV buffers are allocated once per batch/session at capacity C and updated in place.
* A row's tokens do not depend on the other rows of its batch.
* With a prefix cache (on by default: ``prefix_cache_bytes``), the cores of ``generate``/``stream`` and a
  session's first turn start from the longest cached prefix of their prompt and store the prompt blocks
  they compute (docs/ops.md §1 rule 11): the same bits as without it.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from mtx.errors import UsageError
from mtx.runtime.backends import Backend
from mtx import rolling_kv
from mtx.runtime import speculative
from mtx.runtime.core import BatchCore, RequestOutput, feed, seed_from_cache, store_prompt_block
from mtx.runtime.prefix_cache import DEFAULT_PREFIX_CACHE_BYTES, PrefixCache, chain_digests
from mtx.runtime.prefix_state import PrefixState
from mtx.runtime.request import Prompt, Request, prepare_request, prompt_ids
from mtx.runtime.row_decoder import RowDecoder
from mtx.tokenizer import encode_checked

#: Offline batches have no streams to protect from prefill stalls: a step may feed this many prompt tokens.
OFFLINE_TOKEN_BUDGET = 1 << 20


def _check_prompts(prompts: object) -> None:
    if not isinstance(prompts, (list, tuple)) or (prompts and isinstance(prompts[0], (int, np.integer))):
        raise UsageError("prompts must be a list of strings or of token-id lists", params=("prompts",))


class Generator:
    """Text generation from one loaded model. Thread-safe: share one Generator, give each thread its own
    :class:`Session` (or call :meth:`generate`, which makes its own buffers per call)."""

    def __init__(self, backend: Backend, tokenizer: Any | None = None, prefill_chunk: int = 256,
                 eos_token_ids: Sequence[int] | None = None, prefix_cache_bytes: int | None = None) -> None:
        """``prefill_chunk``: the prefill block P (canonical chunks, docs/ops.md §1 rule 7).
        ``prefix_cache_bytes``: bound of the prefix cache (0: off); None: ``DEFAULT_PREFIX_CACHE_BYTES``
        where the model allows it (P no longer than the window), else off (``prefix_cache_status`` says why)."""
        if isinstance(prefill_chunk, bool) or not isinstance(prefill_chunk, int) or prefill_chunk <= 0:
            raise UsageError(f"prefill_chunk must be a positive integer, got {prefill_chunk!r}",
                             params=("prefill_chunk",))
        self.backend = backend
        self.config = backend.config
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.eos_token_ids = tuple(eos_token_ids if eos_token_ids is not None else self.config.eos_token_ids)
        self.prefix_cache: PrefixCache | None = None
        if prefix_cache_bytes is None and backend.per_layer:
            self.prefix_cache_status = "off: the layers differ in KV window (docs/ops.md §1)"
        elif prefix_cache_bytes is None and prefill_chunk > (window := rolling_kv.effective_window(
                backend.window, backend.capacity)):
            self.prefix_cache_status = f"off: prefill_chunk {prefill_chunk} exceeds the window {window}"
        elif prefix_cache_bytes == 0:
            self.prefix_cache_status = "off"
        else:
            nbytes = DEFAULT_PREFIX_CACHE_BYTES if prefix_cache_bytes is None else prefix_cache_bytes
            self.prefix_cache = PrefixCache(nbytes, prefill_chunk, backend.window, backend.capacity)
            self.prefix_cache_status = f"on: {nbytes} bytes"

    # -- text --------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise UsageError("this model folder has no tokenizer.json: pass token ids instead of text")
        return encode_checked(self.tokenizer, text, "tokenizer.json")

    def decode(self, ids: Sequence[int]) -> str:
        if self.tokenizer is None:
            raise UsageError("this model folder has no tokenizer.json: cannot decode ids to text")
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def to_ids(self, prompt: Prompt, what: str = "prompt") -> list[int]:
        """Validate a prompt (text or token ids) and return its ids."""
        return prompt_ids(self, prompt, what)

    def request(self, prompt: Prompt, max_new_tokens: int = 64, **options: Any) -> Request:
        """A prepared :class:`Request` (options as for :meth:`generate`; ``want_text=True`` for text deltas)."""
        return prepare_request(self, prompt, max_new_tokens, **options)

    def core(self, max_batch: int, token_budget: int = OFFLINE_TOKEN_BUDGET, max_deferred_tokens: int = 0
             ) -> BatchCore:
        """A :class:`BatchCore` of ``max_batch`` rows over this model (its KV state allocated now)."""
        return BatchCore(self.backend, self.tokenizer, max_batch, token_budget, self.prefill_chunk,
                         max_deferred_tokens, self.prefix_cache)

    # -- API ---------------------------------------------------------------------------------------
    def session(self, prefix: PrefixState | None = None) -> Session:
        """A single-sequence session with its own KV buffers, for multi-turn use; ``prefix``: start from
        a saved state (:meth:`Session.prefix_state`), as a session that was fed its tokens."""
        return Session(self, prefix)

    def stream_outputs(self, prompts: Sequence[Prompt], max_new_tokens: int = 64, **options: Any
                       ) -> Iterator[tuple[int, RequestOutput]]:
        """Yield (row, :class:`~mtx.runtime.core.RequestOutput`) as the core produces them for a batch of
        prompts: tokens and, with ``want_text=True``, their visible text deltas (stop strings cut).

        Options: ``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``, ``presence_penalty`` and
        ``frequency_penalty`` (OpenAI's, over the generated tokens), ``seed``, ``stop_token_ids`` (default:
        the model's EOS ids), ``stop`` (strings), ``want_text``, ``speculative`` (prompt-lookup decoding:
        ``{"method": "ngram", "num_tokens": k}`` or :class:`~mtx.runtime.speculative.SpeculativeOptions`;
        the same tokens, fewer calls), ``logprobs`` (N: each output's ``logprobs`` holds the token's
        log-probability and the top N, of the raw logits).
        """
        for row, o, _ in self.stream_outputs_with_stats(prompts, max_new_tokens, **options):
            yield row, o

    def stream_outputs_with_stats(self, prompts: Sequence[Prompt], max_new_tokens: int = 64, **options: Any
                                  ) -> Iterator[tuple[int, RequestOutput, speculative.SpeculativeStats]]:
        """:meth:`stream_outputs` with the batch's speculative-decoding counters (updated as it goes)."""
        _check_prompts(prompts)
        if not prompts:
            raise UsageError("no prompts given")
        if len(prompts) > self.backend.max_batch:
            raise UsageError(f"batch of {len(prompts)} prompts exceeds the maximum batch {self.backend.max_batch} "
                             f"of this model (max_batch of the export)", params=("max_batch",))
        requests = [self.request(p, max_new_tokens, rng_stream=r, what=f"prompt {r}", **options)
                    for r, p in enumerate(prompts)]
        row_of = {req.request_id: r for r, req in enumerate(requests)}
        core = self.core(len(requests))
        for req in requests:
            core.add(req)
        while core.has_unfinished():
            for o in core.step():
                if o.error is not None:
                    raise o.error
                yield row_of[o.request_id], o, core.spec_stats

    def stream_batch(self, prompts: Sequence[Prompt], max_new_tokens: int = 64, **options: Any
                     ) -> Iterator[tuple[int, int]]:
        """Yield (row, token) as tokens are produced for a batch of prompts (options: :meth:`stream_outputs`)."""
        for row, o in self.stream_outputs(prompts, max_new_tokens, **options):
            if o.token is not None:
                yield row, o.token

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int = 64, **kw: Any) -> list[list[int]]:
        """Generated token ids per prompt (stop tokens included). See :meth:`stream_batch` for options."""
        _check_prompts(prompts)
        out: list[list[int]] = [[] for _ in prompts]
        for row, tok in self.stream_batch(prompts, max_new_tokens, **kw):
            out[row].append(tok)
        return out

    def stream(self, prompt: Prompt, max_new_tokens: int = 64, **kw: Any) -> Iterator[int]:
        """Yield tokens of one prompt as they are produced."""
        for _, tok in self.stream_batch([prompt], max_new_tokens, **kw):
            yield tok

    def score(self, prompt: Prompt) -> np.ndarray:
        """Logits [T, V] (float32) at every position, teacher-forced through the rolling buffer."""
        s = self.session()
        return s.append(prompt, want_all=True)


class Session:
    """One sequence and its KV buffers (allocated once). Appending a turn reuses the KV state.

    ``tokens`` is the whole conversation; all but possibly the last generated token are in the buffer.
    A call that is refused (bad option, too long) leaves the session as it was.
    Thread-safe: each call holds the session's lock, and a stream holds it only while it computes a
    step's tokens (one, or with ``speculative`` up to k + 1, all added to ``tokens`` before the first is
    yielded), never across ``yield``. A paused stream whose session was changed meanwhile (an append, or
    another stream) raises UsageError when resumed; an abandoned stream blocks nothing.
    The first turn of a fresh session uses the generator's prefix cache (docs/ops.md §1 rule 11).
    """

    def __init__(self, generator: Generator, prefix: PrefixState | None = None) -> None:
        self.generator = generator
        self._state = generator.backend.new_state(1)
        self._lock = threading.Lock()
        self._version = 0  # bumped by every change of tokens / KV state
        self.tokens: list[int] = []
        self._fed = 0
        self._logits: np.ndarray | None = None
        self.spec_stats = speculative.SpeculativeStats()
        if prefix is not None:
            self._seed(prefix)

    def _seed(self, prefix: PrefixState) -> None:
        g = self.generator
        be = g.backend
        p = prefix.position
        if p < 1:
            raise UsageError("prefix state holds no tokens")
        g.to_ids(list(prefix.tokens), "prefix state tokens")
        be.check_positions(p)
        live = rolling_kv.live_positions(p, be.window, be.capacity)
        shape = (g.config.num_layers, g.config.num_kv_heads, len(live), g.config.head_dim)
        if prefix.first != live.start or prefix.keys.shape != shape or prefix.values.shape != shape:
            raise UsageError(f"prefix state: expected keys/values {list(shape)} of positions {live.start}..{p - 1}, "
                             f"got {list(prefix.keys.shape)} from position {prefix.first}")
        be.write_positions(self._state, 0, p, prefix.first, prefix.keys, prefix.values)
        self.tokens = list(prefix.tokens)
        self._fed = p

    @property
    def position(self) -> int:
        """Number of tokens in the KV buffer (the next token's absolute position)."""
        return self._fed

    @property
    def kv_bytes(self) -> int:
        return self.generator.backend.state_nbytes(self._state)

    def prefix_state(self) -> PrefixState:
        """This session's state at its position: the tokens in its buffer and their live keys/values."""
        with self._lock:
            be = self.generator.backend
            if self._fed == 0:
                raise UsageError("session is empty: append a prompt first")
            live = rolling_kv.live_positions(self._fed, be.window, be.capacity)
            keys, values = be.read_positions(self._state, 0, self._fed, live)
            return PrefixState(tuple(self.tokens[:self._fed]), live.start, keys, values)

    def _feed_pending(self, want_all: bool) -> np.ndarray:
        g = self.generator
        start, ids = self._fed, self.tokens[self._fed:]
        on_chunk = None
        cache = g.prefix_cache
        if cache is not None and start == 0 and not want_all:
            digests = chain_digests(ids, cache.block)
            start = seed_from_cache(cache, g.backend, self._state, 0, ids, digests)

            def on_chunk(end: int) -> None:
                store_prompt_block(cache, g.backend, self._state, 0, ids, digests, end)

        logits = feed(g.backend, self._state, 0, self.tokens[start:], start, g.prefill_chunk, want_all, on_chunk)
        self._fed = len(self.tokens)
        self._logits = logits[-1] if want_all else logits
        return logits

    def append(self, prompt: Prompt, want_all: bool = False) -> np.ndarray:
        """Add a turn and run it through the model. Returns the last token's logits [V], or with
        ``want_all`` the logits [T, V] of the appended tokens."""
        with self._lock:
            ids = self.generator.to_ids(prompt, "turn")
            self.generator.backend.check_positions(len(self.tokens) + len(ids))
            n_pending = len(self.tokens) - self._fed
            self._version += 1
            self.tokens.extend(ids)
            logits = self._feed_pending(want_all)
            return logits[n_pending:] if want_all else logits

    def stream(self, max_new_tokens: int = 64, **options: Any) -> Iterator[int]:
        """Continue the sequence, yielding tokens as they are produced (options as for ``Generator.generate``,
        ``speculative`` included)."""
        g = self.generator
        with self._lock:
            if not self.tokens:
                raise UsageError("session is empty: append a prompt before generating")
            if self._logits is None and self._fed == len(self.tokens):
                raise UsageError("this session starts from a saved prefix state, which holds no logits: "
                                 "append a turn before generating")
            request = prepare_request(g, self.tokens[self._fed:], max_new_tokens, history=self._fed, **options)
            decoder = RowDecoder(request, g.tokenizer, history=tuple(self.tokens[:self._fed]))
            proposer = speculative.NgramProposer(request.speculative) if request.speculative else None
            if self._fed < len(self.tokens):
                self._feed_pending(want_all=False)
            self._version += 1
            mine = self._version
        if max_new_tokens == 0:
            return
        while True:
            with self._lock:
                self._check_unchanged(mine)
                produced, finished = self._next_tokens(decoder, proposer)
                self._version += 1
                mine = self._version
            yield from produced
            if finished:
                return  # the last token stays pending until the next append/generate

    def _next_tokens(self, decoder: RowDecoder, proposer: speculative.NgramProposer | None
                     ) -> tuple[list[int], bool]:
        """One decode step under the lock: feed the pending token (or verify it with drafts) and sample.
        Returns the new tokens (appended to ``tokens``; the last one pending) and whether the stream ends."""
        g = self.generator
        if self._fed < len(self.tokens):  # a pending token
            drafts: list[int] = []
            if proposer is not None:
                proposer.extend(self.tokens[len(proposer.context):])
                drafts = proposer.propose(decoder.request.max_new_tokens - len(decoder.generated) - 1)
            if drafts:
                return self._verify(decoder, proposer, drafts)
            self._feed_pending(want_all=False)
        res = decoder.step(self._logits)
        self.tokens.append(res.token)
        return [res.token], res.finish_reason is not None

    def _verify(self, decoder: RowDecoder, proposer: speculative.NgramProposer, drafts: list[int]
                ) -> tuple[list[int], bool]:
        be = self.generator.backend
        v = speculative.verify(be, self._state, 0, self._fed, self.tokens[-1], drafts)
        produced: list[int] = []
        finished = False

        def sample(logits: np.ndarray) -> tuple[int, bool]:
            nonlocal finished
            res = decoder.step(logits)
            produced.append(res.token)
            finished = res.finish_reason is not None
            return res.token, finished

        try:
            accepted = speculative.accept(v, drafts, sample)
        except Exception:
            # The sampling step failed on position start + i after i tokens, each equal to its draft: keep
            # them and make the state the one at start + i + 1, whose logits the call computed.
            i = len(produced)
            if i < len(drafts):
                speculative.rollback(be, self._state, 0, v, i)
            self._fed = v.start + i + 1
            self.tokens.extend(produced)
            self._logits = v.logits[i]
            self._version += 1
            raise
        self.spec_stats.verifications += 1
        self.spec_stats.drafted += len(drafts)
        self.spec_stats.accepted += accepted
        proposer.record(accepted)
        if accepted < len(drafts):
            speculative.rollback(be, self._state, 0, v, accepted)
        self._fed = v.start + accepted + 1
        self.tokens.extend(produced)
        self._logits = None
        return produced, finished

    def _check_unchanged(self, version: int) -> None:
        if self._version != version:
            raise UsageError("this session changed while the stream was paused (append or another stream); "
                             "start a new stream to continue")

    def generate(self, max_new_tokens: int = 64, **kw: Any) -> list[int]:
        return list(self.stream(max_new_tokens, **kw))

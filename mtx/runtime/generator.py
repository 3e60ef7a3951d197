"""Generation over any backend: chunked prefill, batched decode with per-row positions, sessions.

Invariants:
* KV buffers are allocated once per session/batch at capacity C and updated in place.
* Each row carries its own position; a row's tokens do not depend on the other rows of its batch.
* A prompt is prefilled in chunks of at most ``prefill_chunk`` tokens, one row per call (rows differ
  in length and docs/ops.md §1.9 has no padding); decode steps run all rows together.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np

from mtx.errors import UsageError
from mtx.runtime.backends import Backend
from mtx.runtime.sampling import SamplingParams, TokenRng, check_seed, select_token
from mtx.tokenizer import encode_checked

Prompt = Union[str, Sequence[int]]


@dataclass
class _RowStop:
    """Per-row stop bookkeeping: stop token ids and stop strings (checked on the decoded text)."""

    stop_ids: frozenset[int]
    stop_strings: tuple[str, ...]
    decode: Any
    generated: list[int] = field(default_factory=list)
    done: bool = False

    def add(self, token: int) -> bool:
        """Record a generated token; return True if generation of this row ends with it."""
        self.generated.append(token)
        if token in self.stop_ids:
            self.done = True
        elif self.stop_strings:
            text = self.decode(self.generated)
            self.done = any(s in text for s in self.stop_strings)
        return self.done


def _check_prompts(prompts: object) -> None:
    if not isinstance(prompts, (list, tuple)) or (prompts and isinstance(prompts[0], (int, np.integer))):
        raise UsageError("prompts must be a list of strings or of token-id lists", params=("prompts",))


def _check_max_new_tokens(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"max_new_tokens must be an integer >= 0, got {value!r}", params=("max_new_tokens",))


class Generator:
    """Text generation from one loaded model. Thread-safe: share one Generator, give each thread its own
    :class:`Session` (or call :meth:`generate`, which makes its own buffers per call)."""

    def __init__(self, backend: Backend, tokenizer: Any | None = None, prefill_chunk: int = 256,
                 eos_token_ids: Sequence[int] | None = None) -> None:
        if prefill_chunk <= 0:
            raise UsageError(f"prefill_chunk must be positive, got {prefill_chunk}", params=("prefill_chunk",))
        self.backend = backend
        self.config = backend.config
        self.tokenizer = tokenizer
        self.prefill_chunk = prefill_chunk
        self.eos_token_ids = tuple(eos_token_ids if eos_token_ids is not None else self.config.eos_token_ids)

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
        if isinstance(prompt, str):
            try:
                prompt.encode("utf-8")
            except UnicodeEncodeError as e:  # lone surrogates: bytes that were not UTF-8 (shell, file)
                raise UsageError(f"{what}: not valid UTF-8 text (character {e.start})", params=("prompt",)) from None
            ids = self.encode(prompt)
        elif isinstance(prompt, (list, tuple, np.ndarray)) and all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
            ids = [int(t) for t in prompt]
        else:
            raise UsageError(f"{what}: expected text or a list of token ids, got {type(prompt).__name__}"
                             f"{' holding ' + type(prompt[0]).__name__ if isinstance(prompt, (list, tuple)) and prompt else ''}")
        if not ids:
            raise UsageError(f"{what} is empty: give at least one token")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise UsageError(f"{what}: token id {bad[0]} is out of range for a vocabulary of "
                             f"{self.config.vocab_size}")
        return ids

    # -- engine calls ----------------------------------------------------------------------------
    def _prefill(self, state: Any, row: int, ids: Sequence[int], start: int, want_all: bool) -> np.ndarray:
        """Feed ``ids`` for one row from ``start`` in chunks; logits of the last token [V], or of all [T, V]."""
        self.backend.check_positions(start + len(ids))
        outs = []
        for off in range(0, len(ids), self.prefill_chunk):
            chunk = np.asarray([ids[off:off + self.prefill_chunk]], dtype=np.int64)
            logits = self.backend.run(state, slice(row, row + 1), chunk, np.asarray([start + off], dtype=np.int64),
                                      last_only=not want_all)
            outs.append(logits[0])
        return np.concatenate(outs, axis=0) if want_all else outs[-1][-1]

    def _stopper(self, stop_token_ids: Sequence[int] | None, stop: Sequence[str] | str | None) -> _RowStop:
        if isinstance(stop, str):
            stop = [stop]
        if stop and self.tokenizer is None:
            raise UsageError("stop strings need a tokenizer.json in the model folder")
        ids = self.eos_token_ids if stop_token_ids is None else tuple(stop_token_ids)
        return _RowStop(frozenset(int(t) for t in ids), tuple(stop or ()), self.decode)

    # -- API ---------------------------------------------------------------------------------------
    def session(self) -> Session:
        """A single-sequence session with its own KV buffers, for multi-turn use."""
        return Session(self)

    def stream_batch(self, prompts: Sequence[Prompt], max_new_tokens: int = 64, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                     stop_token_ids: Sequence[int] | None = None, stop: Sequence[str] | str | None = None
                     ) -> Iterator[tuple[int, int]]:
        """Yield (row, token) as tokens are produced for a batch of prompts."""
        _check_prompts(prompts)
        if not prompts:
            raise UsageError("no prompts given")
        if len(prompts) > self.backend.max_batch:
            raise UsageError(f"batch of {len(prompts)} prompts exceeds the maximum batch {self.backend.max_batch} "
                             f"of this model (max_batch of the export)", params=("max_batch",))
        _check_max_new_tokens(max_new_tokens)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        params.validate()
        check_seed(seed)
        ids = [self.to_ids(p, f"prompt {i}") for i, p in enumerate(prompts)]
        b = len(ids)
        self.backend.check_positions(max(len(x) for x in ids) + max_new_tokens)
        stops = [self._stopper(stop_token_ids, stop) for _ in range(b)]
        rngs = [TokenRng(seed, stream=r) for r in range(b)]
        state = self.backend.new_state(b)
        logits = np.stack([self._prefill(state, r, ids[r], 0, want_all=False) for r in range(b)])
        pos = np.asarray([len(x) for x in ids], dtype=np.int64)
        for step in range(max_new_tokens):
            last = np.zeros((b, 1), dtype=np.int64)
            for r in range(b):
                if stops[r].done:
                    last[r, 0] = stops[r].generated[-1]
                    continue
                seen = np.asarray(ids[r] + stops[r].generated, dtype=np.int64) if repetition_penalty != 1.0 else None
                tok = select_token(logits[r], params, rngs[r], seen)
                stops[r].add(tok)
                last[r, 0] = tok
                yield r, tok
            if all(s.done for s in stops) or step == max_new_tokens - 1:
                return
            logits = self.backend.run(state, slice(0, b), last, pos, last_only=True)[:, 0]
            pos += 1

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
    Thread-safe: each call holds the session's lock, and a stream holds it only while it computes a
    token, never across ``yield``. A paused stream whose session was changed meanwhile (an append, or
    another stream) raises UsageError when resumed; an abandoned stream blocks nothing.
    """

    def __init__(self, generator: Generator) -> None:
        self.generator = generator
        self._state = generator.backend.new_state(1)
        self._lock = threading.Lock()
        self._version = 0  # bumped by every change of tokens / KV state
        self.tokens: list[int] = []
        self._fed = 0
        self._logits: np.ndarray | None = None

    @property
    def position(self) -> int:
        """Number of tokens in the KV buffer (the next token's absolute position)."""
        return self._fed

    @property
    def kv_bytes(self) -> int:
        return self.generator.backend.state_nbytes(self._state)

    def _feed_pending(self, want_all: bool) -> np.ndarray:
        pending = self.tokens[self._fed:]
        logits = self.generator._prefill(self._state, 0, pending, self._fed, want_all)
        self._fed = len(self.tokens)
        self._logits = logits[-1] if want_all else logits
        return logits

    def append(self, prompt: Prompt, want_all: bool = False) -> np.ndarray:
        """Add a turn and run it through the model. Returns the last token's logits [V], or with
        ``want_all`` the logits [T, V] of the appended tokens."""
        with self._lock:
            ids = self.generator.to_ids(prompt, "turn")
            n_pending = len(self.tokens) - self._fed
            self._version += 1
            self.tokens.extend(ids)
            logits = self._feed_pending(want_all)
            return logits[n_pending:] if want_all else logits

    def stream(self, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
               repetition_penalty: float = 1.0, seed: int | None = None,
               stop_token_ids: Sequence[int] | None = None, stop: Sequence[str] | str | None = None
               ) -> Iterator[int]:
        """Continue the sequence, yielding tokens as they are produced."""
        _check_max_new_tokens(max_new_tokens)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        params.validate()
        check_seed(seed)
        g = self.generator
        stopper = g._stopper(stop_token_ids, stop)
        rng = TokenRng(seed)
        with self._lock:
            if not self.tokens:
                raise UsageError("session is empty: append a prompt before generating")
            g.backend.check_positions(len(self.tokens) + max_new_tokens)
            if self._fed < len(self.tokens):
                self._feed_pending(want_all=False)
            self._version += 1
            mine = self._version
        for step in range(max_new_tokens):
            with self._lock:
                self._check_unchanged(mine)
                seen = np.asarray(self.tokens, dtype=np.int64) if repetition_penalty != 1.0 else None
                tok = select_token(self._logits, params, rng, seen)
                self.tokens.append(tok)
                self._version += 1
                mine = self._version
            yield tok
            if stopper.add(tok) or step == max_new_tokens - 1:
                return  # the last token stays pending until the next append/generate
            with self._lock:
                self._check_unchanged(mine)
                self._feed_pending(want_all=False)
                self._version += 1
                mine = self._version

    def _check_unchanged(self, version: int) -> None:
        if self._version != version:
            raise UsageError("this session changed while the stream was paused (append or another stream); "
                             "start a new stream to continue")

    def generate(self, max_new_tokens: int = 64, **kw: Any) -> list[int]:
        return list(self.stream(max_new_tokens, **kw))

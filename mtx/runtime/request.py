"""A generation request, prepared and validated once (the one home of request preparation).

Every front end — ``Generator.generate/stream``, ``Session.stream``, the serving engine, ``mtx bench`` —
turns its arguments into a :class:`Request` with :func:`prepare_request`, so options mean the same
everywhere and a bad option is refused the same way (``UsageError`` naming the parameter).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Union

import numpy as np

from mtx.errors import UsageError
from mtx.runtime.sampling import MAX_LOGPROBS, SamplingParams, check_seed
from mtx.runtime.speculative import SpeculativeOptions

if TYPE_CHECKING:
    from mtx.runtime.generator import Generator
    from mtx.runtime.grammar import Constraint

Prompt = Union[str, Sequence[int]]

_request_ids = itertools.count(1)


@dataclass(frozen=True)
class Request:
    """A validated request.

    ``prompt_ids``: token ids in ``[0, vocab)``, at least one. ``max_new_tokens`` >= 0.
    ``seed``/``rng_stream``: its ``TokenRng`` (a request alone is stream 0; row r of an offline batch is
    stream r). ``stop_token_ids``: ids that end it (default: the model's EOS ids); ``stop``: stop strings.
    ``want_text``: detokenize as it goes (text deltas in the core's outputs; implied by ``stop``).
    ``speculative``: prompt-lookup decoding options (:mod:`mtx.runtime.speculative`), or None.
    ``constraint``: a compiled grammar (:mod:`mtx.runtime.grammar`) its tokens must follow, or None.
    ``logprobs``: None (none computed), or how many top alternatives each step reports with the chosen
    token's log-probability (0..MAX_LOGPROBS; :class:`~mtx.runtime.sampling.TokenLogprobs`).
    """

    request_id: int
    prompt_ids: tuple[int, ...]
    max_new_tokens: int
    sampling: SamplingParams
    seed: int | None
    rng_stream: int
    stop_token_ids: frozenset[int]
    stop: tuple[str, ...]
    want_text: bool
    speculative: SpeculativeOptions | None = None
    constraint: Constraint | None = None
    logprobs: int | None = None

    @property
    def needs_text(self) -> bool:
        return self.want_text or bool(self.stop)


def with_new_id(request: Request) -> Request:
    """The same request under a fresh id (a prepared Request submitted again runs as a request of its own)."""
    return replace(request, request_id=next(_request_ids))


def check_max_new_tokens(value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise UsageError(f"max_new_tokens must be an integer >= 0, got {value!r}", params=("max_new_tokens",))


def check_logprobs(value: object) -> None:
    """``logprobs`` is None or an integer in [0, MAX_LOGPROBS]."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or
                              not 0 <= value <= MAX_LOGPROBS):
        raise UsageError(f"logprobs must be None or an integer in [0, {MAX_LOGPROBS}], got {value!r}",
                         params=("logprobs",))


def check_utf8(text: str, what: str, param: str | None = "prompt") -> None:
    """UsageError (naming ``param``) if ``text`` holds lone surrogates: bytes that were not UTF-8 (a shell,
    a file, "\\ud800" in JSON)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise UsageError(f"{what}: not valid UTF-8 text (character {e.start})",
                         params=(param,) if param else ()) from None


def prompt_ids(generator: Generator, prompt: object, what: str = "prompt") -> list[int]:
    """Validate a prompt (text or token ids) and return its ids."""
    if isinstance(prompt, str):
        check_utf8(prompt, what)
        ids = generator.encode(prompt)
    elif isinstance(prompt, (list, tuple, np.ndarray)) and all(
            isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in prompt):
        ids = [int(t) for t in prompt]
    else:
        raise UsageError(f"{what}: expected text or a list of token ids, got {type(prompt).__name__}"
                         f"{' holding ' + type(prompt[0]).__name__ if isinstance(prompt, (list, tuple)) and prompt else ''}")
    if not ids:
        raise UsageError(f"{what} is empty: give at least one token")
    vocab = generator.config.vocab_size
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise UsageError(f"{what}: token id {bad[0]} is out of range for a vocabulary of {vocab}")
    return ids


def prepare_request(generator: Generator, prompt: Prompt, max_new_tokens: int = 64, *, temperature: float = 0.0,
                    top_k: int = 0, top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
                    stop_token_ids: Sequence[int] | None = None, stop: Sequence[str] | str | None = None,
                    rng_stream: int = 0, want_text: bool = False, what: str = "prompt", history: int = 0,
                    speculative: object = None, constraint: Constraint | None = None,
                    presence_penalty: float = 0.0, frequency_penalty: float = 0.0, logprobs: int | None = None
                    ) -> Request:
    """The :class:`Request` for ``prompt``; raises UsageError naming the first bad parameter.

    ``history``: tokens already in the row's KV before ``prompt`` (a session's earlier turns), counted
    against the model's position limit. ``speculative``: :class:`SpeculativeOptions`, a mapping of its
    fields (vLLM's names), an int (``num_tokens``) or None. ``constraint``: a compiled grammar
    (:class:`mtx.runtime.grammar.Constraint`) or None. ``presence_penalty``/``frequency_penalty``:
    OpenAI's, in [-2, 2] (:class:`SamplingParams`). ``logprobs``: top alternatives to report per token
    (None: no log-probabilities computed).
    """
    check_max_new_tokens(max_new_tokens)
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty, presence_penalty, frequency_penalty)
    params.validate()
    check_logprobs(logprobs)
    check_seed(seed)
    spec = SpeculativeOptions.parse(speculative)
    if spec is not None:
        spec.validate(generator.backend.window, generator.backend.capacity)
    if isinstance(stop, str):
        stop = [stop]
    stop_strings = tuple(stop or ())
    if any(not isinstance(s, str) for s in stop_strings):
        raise UsageError("stop must be a string or a list of strings", params=("stop",))
    if any(s == "" for s in stop_strings):
        raise UsageError("stop: an empty stop string would stop before any text; remove it", params=("stop",))
    if (stop_strings or want_text) and generator.tokenizer is None:
        raise UsageError("stop strings need a tokenizer.json in the model folder", params=("stop",))
    if stop_token_ids is None:
        stop_ids = frozenset(generator.eos_token_ids)
    else:
        if isinstance(stop_token_ids, (str, bytes)) or not all(
                isinstance(t, (int, np.integer)) and not isinstance(t, bool) for t in stop_token_ids):
            raise UsageError("stop_token_ids must be a list of integers", params=("stop_token_ids",))
        vocab = generator.config.vocab_size
        bad = [int(t) for t in stop_token_ids if not 0 <= int(t) < vocab]
        if bad:
            raise UsageError(f"stop_token_ids: id {bad[0]} is out of range for a vocabulary of {vocab}",
                             params=("stop_token_ids",))
        stop_ids = frozenset(int(t) for t in stop_token_ids)
    if history and isinstance(prompt, (list, tuple)) and not prompt:
        ids: list[int] = []  # a session whose tokens are all in its KV already: nothing new to feed
    else:
        ids = prompt_ids(generator, prompt, what)
    generator.backend.check_positions(history + len(ids) + max_new_tokens)
    return Request(next(_request_ids), tuple(ids), max_new_tokens, params, seed, rng_stream, stop_ids, stop_strings,
                   want_text, spec, constraint, logprobs)

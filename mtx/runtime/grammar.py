"""Structured output: a grammar applied as a token mask in the one sampling step (llguidance).

* :func:`llg_tokenizer` bridges the model's tokenizer to llguidance: HF ``tokenizers`` JSON as is;
  Mistral's Tekken through mistral_common's own bridge (``mistral_common.guidance``); Mistral's
  SentencePiece files from their pieces (``▁`` is a space, ``<0xNN>`` a byte). Anything else is
  refused in one line (UsageError).
* :class:`GrammarCompiler` turns a :class:`GrammarSpec` (JSON schema, regex, choice, Lark/GBNF) into a
  :class:`Constraint`: the grammar compiled once, on the caller's thread (the server's worker pool,
  never its event loop), under :data:`LIMITS` and at most :data:`MAX_GRAMMAR_CHARS` characters. An
  invalid grammar is a UsageError naming the request field it came from.
* :class:`ConstraintState` is one request's matcher (a copy of the constraint's pristine one):
  :meth:`ConstraintState.select` samples among the tokens the grammar allows, :meth:`ConstraintState.advance`
  consumes the sampled token. Only constrained rows have one, so unconstrained rows do no mask work.

Invariant: a constrained request's tokens are always a prefix of a string of the grammar; the request
finishes ("stop") when the grammar is complete (nothing but EOS may follow) or when an accepting
grammar samples EOS.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtx.errors import UsageError
from mtx.runtime.sampling import SamplingParams, TokenRng, penalised_logits, select_token

#: Characters a grammar or schema may have (it is compiled per request).
MAX_GRAMMAR_CHARS = 256 * 1024
#: JSON as Python's json.dumps writes it: "a": 1, "b": 2 (no other whitespace), so a model can't pad forever.
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
#: Grammar kinds and how llguidance reads their text.
KINDS = ("json_schema", "regex", "choice", "grammar", "lark")


def limits() -> Any:
    """llguidance's parser limits: bound the compile (lexer fuel, grammar size) and each mask step."""
    import llguidance

    return llguidance.LLParserLimits(initial_lexer_fuel=1_000_000, step_lexer_fuel=200_000, step_max_items=50_000,
                                     max_grammar_size=200_000, max_lexer_states=100_000, verbose_errors=False)


def _first_line(text: str) -> str:
    lines = [ln.strip() for ln in str(text).strip().splitlines() if ln.strip()]
    return lines[0][:300] if lines else "invalid grammar"


@dataclass(frozen=True)
class GrammarSpec:
    """A grammar as the client gave it: ``kind`` (one of KINDS), ``text`` (a JSON schema as JSON text, a
    regex, a JSON list of choices, a Lark/GBNF grammar) and ``field``, the request field it came from."""

    kind: str
    text: str
    field: str


class _SentencePieceWords:
    """llguidance's TokenizerWrapper interface over a Mistral SentencePiece tokenizer (mistral_common):
    each id's bytes (``▁`` -> space, ``<0xNN>`` -> that byte; control tokens as ``<NAME>``)."""

    def __init__(self, raw: Any) -> None:
        special = {int(i) for i in raw.special_ids}
        self.bos_token_id, self.eos_token_id = int(raw.bos_id), int(raw.eos_id)
        self.special_token_ids = sorted(special)
        self.tokens: list[bytes] = []
        for i in range(raw.n_words):
            piece = raw.id_to_piece(i)
            if i in special:
                name = piece[1:-1] if piece.startswith("[") and piece.endswith("]") else piece.strip("<>")
                self.tokens.append(f"<{name}>".encode())
            elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
                self.tokens.append(bytes([int(piece[3:5], 16)]))
            else:
                self.tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
        self._raw = raw
        self._lead = list(raw.encode("\n", bos=False, eos=False))

    def __call__(self, text: str) -> list[int]:
        """Ids of ``text`` as it reads mid-sequence: without SentencePiece's dummy prefix (a space that
        ``encode`` adds at the start), which would tell llguidance that "{" is spelt " {". Encoded after a
        newline, which no piece merges across, and the newline's ids dropped."""
        ids = list(self._raw.encode("\n" + text, bos=False, eos=False))
        lead = self._lead
        return ids[len(lead):] if ids[:len(lead)] == lead else list(self._raw.encode(text, bos=False, eos=False))


def llg_tokenizer(tokenizer: Any, vocab_size: int, eos_token_ids: Sequence[int]) -> Any:
    """The llguidance ``LLTokenizer`` of the model's tokenizer (costs ~1 s for a large vocabulary: cache it).

    UsageError (one line) for a tokenizer llguidance cannot read."""
    try:
        import llguidance
    except ImportError:
        raise UsageError("structured output needs the llguidance package (pip install 'mtx[serve]')") from None
    from mtx.tokenizer import MistralTextTokenizer

    eos = [int(t) for t in eos_token_ids] or None
    try:
        if isinstance(tokenizer, MistralTextTokenizer):
            raw = tokenizer.mistral.instruct_tokenizer.tokenizer
            from mistral_common.tokens.tokenizers.tekken import is_tekkenizer

            if is_tekkenizer(raw):
                from mistral_common.guidance.tokenizer import MistralLLGTokenizer

                return llguidance.LLTokenizer(llguidance.TokenizerWrapper(MistralLLGTokenizer(raw)), eos_token=eos)
            return llguidance.LLTokenizer(llguidance.TokenizerWrapper(_SentencePieceWords(raw)), eos_token=eos)
        to_str = getattr(tokenizer, "to_str", None)
        if to_str is None:
            raise ValueError(f"a {type(tokenizer).__name__} is neither a tokenizers.Tokenizer nor Mistral's")
        n_vocab = max(int(vocab_size), int(tokenizer.get_vocab_size(with_added_tokens=True)))
        return llguidance.LLTokenizer(to_str(), n_vocab=n_vocab, eos_token=eos)
    except (KeyboardInterrupt, SystemExit, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - llguidance and mistral_common raise ValueError, TypeError, ...
        raise UsageError(f"structured output: llguidance cannot read this model's tokenizer ({_first_line(e)})"
                         ) from None


def grammar_text(spec: GrammarSpec) -> str:
    """llguidance's grammar of ``spec`` (not yet checked); UsageError naming ``spec.field`` when it is not
    one llguidance can read."""
    import llguidance

    if len(spec.text) > MAX_GRAMMAR_CHARS:
        raise UsageError(f"{spec.field}: at most {MAX_GRAMMAR_CHARS} characters, got {len(spec.text)}",
                         params=(spec.field,))
    try:
        if spec.kind == "json_schema":
            return llguidance.LLMatcher.grammar_from_json_schema(spec.text, overrides=JSON_OPTIONS)  # type: ignore
        if spec.kind in ("regex", "choice", "lark"):
            return llguidance.grammar_from(spec.kind, spec.text)  # type: ignore[arg-type]
        if spec.kind == "grammar":  # Lark, or GBNF converted to Lark
            return llguidance.grammar_from("grammar", spec.text)
    except ValueError as e:
        raise UsageError(f"{spec.field}: {_first_line(e)}", params=(spec.field,)) from None
    raise UsageError(f"{spec.field}: unknown grammar kind {spec.kind!r}", params=(spec.field,))


class Constraint:
    """A compiled grammar: a pristine matcher to copy per request, with the tokenizer bridge it masks
    over. Immutable once built (a Request holding it may run many times)."""

    def __init__(self, matcher: Any, tokenizer: Any, spec: GrammarSpec) -> None:
        self._matcher = matcher
        self.tokenizer = tokenizer
        self.spec = spec
        self.eos = frozenset(int(t) for t in tokenizer.eos_tokens)
        self.n_vocab = int(tokenizer.vocab_size)

    def start(self) -> ConstraintState:
        """A fresh matcher state for one run of a request."""
        return ConstraintState(self, self._matcher.deep_copy())


class ConstraintState:
    """One request's grammar state: mask, sample, advance. ``done``: the grammar is complete."""

    def __init__(self, constraint: Constraint, matcher: Any) -> None:
        self.constraint = constraint
        self.matcher = matcher
        self.done = False
        self._bits = np.zeros((constraint.n_vocab + 31) // 32, dtype=np.int32)

    def allowed(self, vocab: int) -> np.ndarray:
        """Ids in ``[0, vocab)`` the grammar allows next (ascending); ValueError if none."""
        self.matcher.unsafe_compute_mask_ptr(self._bits.ctypes.data, self._bits.nbytes)
        bits = np.unpackbits(self._bits.view(np.uint8), bitorder="little")
        ids = np.flatnonzero(bits[:min(vocab, bits.size)])
        if ids.size == 0:
            why = _first_line(self.matcher.get_error() or "dead end")
            raise ValueError(f"the grammar allows no token here ({why})")
        return ids

    def select(self, logits: np.ndarray, params: SamplingParams, rng: TokenRng, seen: np.ndarray | None,
               generated: np.ndarray | None = None) -> int:
        """:func:`select_token` over the allowed tokens only: the draw of the full row with every other
        logit -inf (greedy: the first maximum; sampling: the same filters and inverse CDF, in id order).
        Penalties apply to the full row first (:func:`penalised_logits`)."""
        ids = self.allowed(logits.shape[-1])
        logits = penalised_logits(logits, params, seen, generated)
        return int(ids[select_token(logits[ids], params, rng)])

    def advance(self, token: int) -> bool:
        """Consume the sampled ``token``; True once the grammar is complete (or EOS ended it)."""
        if not self.matcher.consume_token(int(token)):
            raise ValueError(f"the grammar refused token {token} ({_first_line(self.matcher.get_error())})")
        self.done = bool(self.matcher.is_stopped()) or (int(token) in self.constraint.eos)
        return self.done


class GrammarCompiler:
    """Compiles grammars against one model's tokenizer (the llguidance bridge built once, on first use).
    Thread-safe: the server's worker threads share one."""

    def __init__(self, tokenizer: Any | None, vocab_size: int, eos_token_ids: Sequence[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = tuple(eos_token_ids)
        self._llg: Any = None
        self._error: UsageError | None = None
        self._lock = threading.Lock()

    def bridge(self, field: str) -> Any:
        """The LLTokenizer; UsageError naming ``field`` when the model has none llguidance reads."""
        with self._lock:
            if self._llg is None and self._error is None:
                if self.tokenizer is None:
                    self._error = UsageError("structured output needs a tokenizer in the model folder")
                else:
                    try:
                        self._llg = llg_tokenizer(self.tokenizer, self.vocab_size, self.eos_token_ids)
                    except UsageError as e:
                        self._error = e
        if self._error is not None:
            raise UsageError(f"{field}: {self._error}", params=(field,))
        return self._llg

    def compile(self, spec: GrammarSpec) -> Constraint:
        """The :class:`Constraint` of ``spec`` (compiled here, under :func:`limits`); UsageError naming
        ``spec.field`` if the grammar is invalid or too large."""
        import llguidance

        tok = self.bridge(spec.field)
        text = grammar_text(spec)
        matcher = llguidance.LLMatcher(tok, text, log_level=0, limits=limits())
        if matcher.is_error():
            raise UsageError(f"{spec.field}: invalid: {_first_line(matcher.get_error())}", params=(spec.field,))
        return Constraint(matcher, tok, spec)


def json_schema_spec(schema: Any, field: str) -> GrammarSpec:
    """The spec of a JSON schema (an object, or ``true``); UsageError naming ``field`` otherwise."""
    if schema is True:
        schema = {}
    if not isinstance(schema, dict):
        raise UsageError(f"{field}: a JSON schema must be an object, got {type(schema).__name__}", params=(field,))
    return GrammarSpec("json_schema", json.dumps(schema), field)

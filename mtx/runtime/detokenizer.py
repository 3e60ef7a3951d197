"""Incremental text of generated ids, and OpenAI stop strings over it: the one place text is assembled.

Invariants (``decode`` is ``tokenizer.decode(ids, skip_special_tokens=...)`` of the ids pushed so far):

* The deltas an :class:`IncrementalDetokenizer` returns always join to a prefix of ``decode``, and
  after ``flush()`` to ``decode`` itself. Each push decodes only a window of recent ids: from the
  start of the previous delta's ids (context, so that decoders which strip the first token's leading
  space, as Metaspace and Strip do, treat the new ids as mid-text) to the newest id.
* Text is held back (not final) while the newest id that decode keeps is a byte-fallback token
  (``<0xNN>``; a skipped special token between bytes does not end their run) or the window's text
  ends in U+FFFD. HF's ByteFallback decoder judges a run of byte ids as a whole (one invalid byte
  turns the *whole run* into U+FFFDs: ``decode([<0x0A>])`` is ``"\\n"`` but ``decode([<0x0A>, <0xE2>])``
  is two U+FFFDs), so no text of a run is final before the run ends; and a byte-level (GPT-2)
  decoder's trailing U+FFFD may still become a character with the next byte.
* Stop strings are matched on a bounded tail only (held text < the longest stop string, plus the new
  text); text released once can never be the start of a stop string.

``tokenizers.decoders.DecodeStream`` is not used: on a byte-fallback run that is not valid UTF-8
(``<0x0A> <0xE2> <0x82> ▁Hello``) tokenizers 0.23 raises "Invalid prefix encountered while decoding
stream" instead of yielding the U+FFFDs that ``decode`` gives, so it cannot meet the invariant.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from mtx.errors import UsageError

_REPLACEMENT = "\ufffd"


def _is_byte_token(piece: str | None) -> bool:
    """Whether ``piece`` may be a byte-fallback token ``<0xNN>`` (a superset of what HF's ByteFallback
    decoder parses; a false positive only delays text by one id)."""
    return piece is not None and len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")


class IncrementalDetokenizer:
    """Text of a growing id sequence in deltas. Invariant: the concatenation of every delta returned by
    push() is always a prefix of tokenizer.decode(ids, skip_special_tokens=skip_special_tokens) of the ids
    pushed so far, and after flush() it equals it exactly. Work per token is bounded by a small window of
    recent ids (plus any run of ids whose text still ends in U+FFFD, which is held back because a later
    byte may complete the character)."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True) -> None:
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        # The window: ids from the start of the previous delta's ids (context) on; _win[:_read] is
        # text already returned, _win[_read:] is not. Its text is decode(_win) minus decode(_win[:_read]).
        self._win: list[int] = []
        self._read = 0
        self._head: str | None = ""  # decode(_win[:_read]), computed lazily after the window moves
        self._pending_cache: tuple[int, str | None] | None = None  # (len(_ids), _pending()) of the last decode
        self._returned = 0  # characters returned so far
        self._in_run = False  # the last id that decode keeps is a byte-fallback token
        self._skipped_cache: dict[int, bool] = {}
        self._flushed = False

    @property
    def ids(self) -> list[int]:
        """Every id pushed so far (the detokenizer's own list: read it, do not modify it)."""
        return self._ids

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _head_text(self) -> str:
        if self._head is None:
            self._head = self._decode(self._win[:self._read])
        return self._head

    def _pending(self) -> str | None:
        """The text after the returned text, final or not (decode of the ids so far minus the deltas
        returned); None where the window's text does not extend the returned text (a decoder that is
        not local), so that nothing can be said without decoding everything."""
        if self._pending_cache is not None and self._pending_cache[0] == len(self._ids):
            return self._pending_cache[1]
        head, text = self._head_text(), self._decode(self._win)
        pending = text[len(head):] if text.startswith(head) else None
        self._pending_cache = (len(self._ids), pending)
        return pending

    def _skipped(self, token: int) -> bool:
        """Whether decode drops ``token`` (a special token under skip_special_tokens): then it neither
        ends a byte-fallback run nor needs a place in the window."""
        if not self._skip:
            return False
        if token not in self._skipped_cache:
            self._skipped_cache[token] = (self._decode([token]) == ""
                                          and self._tok.decode([token], skip_special_tokens=False) != "")
        return self._skipped_cache[token]

    def push(self, token: int) -> str:
        """Add one id; return the text that became final with it, possibly ""."""
        if self._flushed:
            raise UsageError("push after flush: this detokenizer's sequence has ended; start a new one")
        token = int(token)
        self._ids.append(token)
        self._win.append(token)
        if _is_byte_token(self._tok.id_to_token(token)):
            self._in_run = True
            return ""  # a byte-fallback run is judged as a whole once it ends
        if self._in_run:
            if self._skipped(token):  # decode drops it: the run goes on past it
                self._win.pop()
                return ""
            self._in_run = False
        pending = self._pending()
        if pending is None or pending.endswith(_REPLACEMENT):
            return ""
        if not pending:
            if self._skipped(token):
                self._win.pop()  # decode drops it, so the window need not hold it
            return ""
        # The new ids' text is final: the window now starts at them (they are the next push's context).
        del self._win[:self._read]
        self._read = len(self._win)
        self._head = None
        self._pending_cache = (len(self._ids), "")
        self._returned += len(pending)
        return pending

    def flush(self) -> str:
        """Everything not yet returned: afterwards the deltas join to the decode of all ids. Ends the
        sequence (a later push raises UsageError); a second flush returns ""."""
        if self._flushed:
            return ""
        self._flushed = True
        pending = self._pending()
        if pending is None:  # a decoder that is not local: decode everything once
            pending = self._decode(self._ids)[self._returned:]
        self._win, self._read, self._head, self._pending_cache = [], 0, "", None
        self._returned += len(pending)
        return pending


def _check_stops(stop: Sequence[str] | str) -> tuple[str, ...]:
    if isinstance(stop, str):
        stop = (stop,)
    out: list[str] = []
    for s in stop:
        if not isinstance(s, str):
            raise UsageError(f"stop: expected strings, got {type(s).__name__}", params=("stop",))
        if not s:
            raise UsageError("stop: an empty stop string would stop before any text; give non-empty strings",
                             params=("stop",))
        if s not in out:
            out.append(s)
    return tuple(out)


class StopStringMatcher:
    """OpenAI stop strings over a text stream: visible text ends before the first occurrence of any stop string;
    text that might be the start of a stop string is held back. Each push checks only a bounded tail
    (the longest stop string − 1 characters of held/previous text plus the new delta), never the whole text."""

    def __init__(self, stop: Sequence[str]) -> None:
        self.stop = _check_stops(stop)
        self._longest = max((len(s) for s in self.stop), default=0)
        self._held = ""  # a suffix of the text that may start a stop string; always < self._longest chars
        self.stopped = False

    def push(self, delta: str) -> tuple[str, bool]:
        """(visible delta, stopped). Once stopped, push returns ("", True)."""
        return self._push(delta, "")

    def _push(self, delta: str, tentative: str) -> tuple[str, bool]:
        """Like :meth:`push`, also stopping at a stop string that ``tentative`` (text that follows
        ``delta`` if generation ended now) completes; the visible delta then runs into ``tentative``."""
        if self.stopped:
            return "", True
        if not self.stop:
            return delta, False
        buf = self._held + delta
        tail = buf + tentative
        cut = min((i for i in (tail.find(s) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped, self._held = True, ""
            return tail[:cut], True
        keep = self._partial(buf)
        self._held = buf[len(buf) - keep:]
        return buf[:len(buf) - keep], False

    def _partial(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop string."""
        for k in range(min(len(text), self._longest - 1), 0, -1):
            end = text[-k:]
            if any(s.startswith(end) for s in self.stop):
                return k
        return 0

    def flush(self) -> str:
        """Held text at the end of generation (when not stopped)."""
        held, self._held = ("" if self.stopped else self._held), ""
        return held


class TextStream:
    """Detokenizer + stop matcher for one generated sequence: the one place text is assembled."""

    def __init__(self, tokenizer: Any | None, stop: Sequence[str] = (), skip_special_tokens: bool = True) -> None:
        self._matcher = StopStringMatcher(stop)
        if tokenizer is None and self._matcher.stop:
            raise UsageError("stop strings need a tokenizer.json in the model folder", params=("stop",))
        self._detok = None if tokenizer is None else IncrementalDetokenizer(tokenizer, skip_special_tokens)
        self._parts: list[str] = []
        self._finished = False

    def push(self, token: int) -> tuple[str, bool]:
        """(visible text delta, a stop string was completed). A stop string counts from the token whose
        text completes it, as in ``any(s in decode(ids so far))``, even where that text is not final yet
        (a byte-fallback run); the visible text then ends before its first occurrence. After a stop,
        push returns ("", True)."""
        if self._detok is None:
            return "", False
        if self._matcher.stopped:
            return "", True
        delta = self._detok.push(token)
        tentative = ""
        if self._matcher.stop:
            tentative = self._detok._pending() or ""
        visible, stopped = self._matcher._push(delta, tentative)
        if visible:
            self._parts.append(visible)
        return visible, stopped

    def finish(self) -> str:
        """The remaining visible text when generation ends ("" after a stop, or a second time)."""
        if self._detok is None or self._finished:
            return ""
        self._finished = True
        if self._matcher.stopped:
            return ""
        visible, stopped = self._matcher.push(self._detok.flush())
        if not stopped:
            visible += self._matcher.flush()
        if visible:
            self._parts.append(visible)
        return visible

    @property
    def text(self) -> str:
        """All visible text returned so far."""
        if len(self._parts) > 1:
            self._parts[:] = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    @property
    def stopped(self) -> bool:
        """Whether a stop string ended the text."""
        return self._matcher.stopped

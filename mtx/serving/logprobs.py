"""Log-probabilities in OpenAI's shapes: the text and bytes of single tokens, and the ``logprobs``
object of a chat choice or of a completion choice.

The values are the core's (:class:`~mtx.runtime.sampling.TokenLogprobs`: log-softmax of the model's
raw logits, before penalties, temperature, filters and any grammar mask); this module only names
tokens and arranges.

* A token's ``bytes`` are the bytes it stands for in the vocabulary: SentencePiece's ``▁`` is a space
  and a byte-fallback piece ``<0xNN>`` the byte NN; a byte-level (GPT-2 style) piece is mapped back
  through its byte alphabet; Tekken's (mistral_common) are its own byte pieces. Control tokens read as
  their text (``</s>``). Its ``token`` is those bytes as UTF-8, invalid sequences (a lone byte of a
  multi-byte character) replaced by U+FFFD, as OpenAI does.
* Chat: ``{"content": [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}]}``
  (``top_logprobs``: the request's ``top_logprobs`` most likely tokens, most likely first).
* Completions: ``{"tokens", "token_logprobs", "top_logprobs", "text_offset"}``; each ``top_logprobs``
  entry maps token text to logprob for the ``logprobs`` most likely tokens plus the chosen one (so up to
  N + 1 entries, as OpenAI documents); ``text_offset`` is each token's character offset in the
  completion's text (from 0; the concatenation of the token texts), continued across stream chunks.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Any

from mtx.runtime.sampling import TokenLogprobs


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[str, int]:
    """The byte-level BPE alphabet (character -> byte): printable Latin-1 bytes stand for themselves,
    the other bytes for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return {c: b for b, c in chars.items()}


def _decoder_types(tokenizer: Any) -> set[str]:
    """The ``type`` names in a ``tokenizers.Tokenizer``'s decoder (nested sequences included)."""
    try:
        spec = json.loads(tokenizer.to_str()).get("decoder") or {}
    except Exception:  # noqa: BLE001 - not a tokenizers.Tokenizer
        return set()
    types: set[str] = set()
    stack = [spec]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            types.add(str(d.get("type")))
            stack.extend(d.get("decoders") or [])
    return types


class TokenTexts:
    """``bytes``/``text`` of single token ids of one tokenizer, or of none (cached per id; two threads
    racing on an id compute the same value)."""

    def __init__(self, tokenizer: Any | None) -> None:
        self.tokenizer = tokenizer
        raw = getattr(tokenizer, "_raw", None)  # mtx.tokenizer.MistralTextTokenizer
        self._tekken = raw if raw is not None and hasattr(raw, "id_to_byte_piece") else None
        self._byte_level = self._tekken is None and "ByteLevel" in _decoder_types(tokenizer)
        try:
            self._added = {int(i): t.content for i, t in tokenizer.get_added_tokens_decoder().items()}
        except AttributeError:
            self._added = {}
        self._cache: dict[int, bytes] = {}

    def bytes_of(self, token: int) -> bytes:
        """The bytes token ``token`` stands for (empty for an id outside the vocabulary)."""
        b = self._cache.get(token)
        if b is None:
            b = self._cache[token] = self._compute(token)
        return b

    def text_of(self, token: int) -> str:
        """The token's text (``token_id:N`` without a tokenizer, as vLLM names such tokens)."""
        if self.tokenizer is None:
            return f"token_id:{token}"
        return self.bytes_of(token).decode("utf-8", errors="replace")

    def _compute(self, token: int) -> bytes:
        if self.tokenizer is None:
            return b""
        if self._tekken is not None:
            from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy

            return bytes(self._tekken.id_to_byte_piece(token, SpecialTokenPolicy.KEEP))
        if token in self._added:
            return self._added[token].encode("utf-8")
        piece = self.tokenizer.id_to_token(token)
        if piece is None:
            return b""
        if self._byte_level:
            alphabet = _byte_alphabet()
            if all(c in alphabet for c in piece):
                return bytes(alphabet[c] for c in piece)
            return piece.encode("utf-8")
        if len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            try:
                return bytes([int(piece[3:5], 16)])
            except ValueError:
                pass
        return piece.replace("\u2581", " ").encode("utf-8")


def chat_entry(texts: TokenTexts, token: int, lp: TokenLogprobs) -> dict[str, Any]:
    """One element of a chat choice's ``logprobs.content``."""
    def one(t: int, value: float) -> dict[str, Any]:
        return {"token": texts.text_of(t), "logprob": value, "bytes": list(texts.bytes_of(t))}

    return {**one(token, lp.logprob), "top_logprobs": [one(t, v) for t, v in lp.top]}


def chat_logprobs(texts: TokenTexts, steps: list[tuple[int, TokenLogprobs]]) -> dict[str, Any]:
    """A chat choice's ``logprobs`` of its tokens ``steps`` ((token, logprobs) in order)."""
    return {"content": [chat_entry(texts, t, lp) for t, lp in steps], "refusal": None}


def completion_logprobs(texts: TokenTexts, steps: list[tuple[int, TokenLogprobs]], offset: int = 0
                        ) -> tuple[dict[str, Any], int]:
    """A completion choice's ``logprobs`` of ``steps`` whose first token starts at character ``offset``
    of the completion; returns it and the offset after the last token."""
    out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for t, lp in steps:
        text = texts.text_of(t)
        top = {texts.text_of(i): v for i, v in lp.top}
        top.setdefault(text, lp.logprob)
        out["tokens"].append(text)
        out["token_logprobs"].append(lp.logprob)
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset

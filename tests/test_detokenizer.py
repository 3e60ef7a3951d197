"""mtx.runtime.detokenizer against HF tokenizers' own decode of all ids (the oracle), on tokenizers built
here: SentencePiece-style BPE with byte fallback (Mistral v1), byte-level BPE (GPT-2), special tokens,
and the built-in export's tokenizer."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

from mtx.errors import UsageError
from mtx.runtime.detokenizer import IncrementalDetokenizer, StopStringMatcher, TextStream

ASSET = Path(__file__).resolve().parents[1] / "mtx" / "assets" / "default-mistral" / "tokenizer.json"
SPECIALS = ["<unk>", "<s>", "</s>"]
CORPUS = ["Hello world, the quick brown fox jumps over the lazy dog.",
          "Ünïcödé façade naïve café — “quotes” … 中文字符 日本語 한국어 😀🚀👍🏽 ∑∫√",
          "def f(x):\n    return x * 2  # tabs\tand newlines\n\n", "the the the theory thermal other"] * 3
PIECES = ["▁", "▁the", "▁Hello", "▁world", "▁a", "he", "llo", "ing", "é", "中", "—", ",", ".", "\n", "▁▁"] + \
    [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]


def sp_tokenizer(metaspace_decoder: bool = False) -> Tokenizer:
    """SentencePiece-style BPE with byte fallback, as HF converts Mistral v1: ``<0x00>``..``<0xFF>``
    byte tokens, Prepend/Replace normalizer; decoder Replace+ByteFallback+Fuse+Strip (or Metaspace)."""
    vocab = {s: i for i, s in enumerate(SPECIALS)}
    vocab.update({f"<0x{b:02X}>": len(SPECIALS) + b for b in range(256)})
    for p in PIECES:
        vocab.setdefault(p, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    if metaspace_decoder:
        tok.decoder = decoders.Sequence([decoders.Metaspace(replacement="▁", prepend_scheme="first"),
                                         decoders.ByteFallback(), decoders.Fuse()])
    else:
        tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                         decoders.Strip(" ", 1, 0)])
    return tok


def byte_level_tokenizer() -> Tokenizer:
    """GPT-2 style byte-level BPE trained here on a small corpus, with special tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return tok


TOKENIZERS = {"sp-strip": lambda: sp_tokenizer(False), "sp-metaspace": lambda: sp_tokenizer(True),
              "byte-level": byte_level_tokenizer, "builtin": lambda: Tokenizer.from_file(str(ASSET))}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def tok(request) -> Tokenizer:
    return TOKENIZERS[request.param]()


def byte_ids(tok: Tokenizer) -> list[int]:
    """Ids of single-byte tokens: ``<0xNN>`` (byte fallback) or the 256 byte-level characters."""
    vocab = tok.get_vocab()
    ids = [i for s, i in vocab.items() if len(s) == 6 and s.startswith("<0x")]
    return ids or [vocab[c] for c in pre_tokenizers.ByteLevel.alphabet() if c in vocab]


def decode(tok: Any, ids: list[int], skip: bool = True) -> str:
    return tok.decode(ids, skip_special_tokens=skip)


def random_ids(tok: Tokenizer, rng: random.Random, n: int, byte_bias: float) -> list[int]:
    """Uniform ids over the vocabulary, with runs of byte tokens (valid characters cut into bytes,
    and stray bytes) and of encoded multi-byte text with probability ``byte_bias``."""
    size, bytes_ = tok.get_vocab_size(), byte_ids(tok)
    out: list[int] = []
    while len(out) < n:
        r = rng.random()
        if r < byte_bias / 2:
            out.extend(rng.choice(bytes_) for _ in range(rng.randint(1, 4)))
        elif r < byte_bias:
            out.extend(tok.encode(rng.choice("é中😀—ü日한∑👍🏽") * rng.randint(1, 2), add_special_tokens=False).ids)
        else:
            out.append(rng.randrange(size))
    return out[:n]


def stream_and_check(tok: Any, ids: list[int], skip: bool) -> str:
    det = IncrementalDetokenizer(tok, skip_special_tokens=skip)
    got = ""
    for t, token in enumerate(ids):
        got += det.push(token)
        want = decode(tok, ids[:t + 1], skip)
        assert want.startswith(got), (t, ids[:t + 1], got, want)
    got += det.flush()
    assert got == decode(tok, ids, skip), ids
    assert det.ids == ids
    return got


def test_byte_fallback_run_that_is_not_utf8():
    """The case a "return nothing while incomplete" stream never recovers from: the run is judged as a
    whole by ByteFallback (every byte of it becomes U+FFFD), and the text after it still streams."""
    tok = sp_tokenizer()
    v = tok.get_vocab()
    ids = [v["<0x0A>"], v["<0xE2>"], v["<0x82>"], v["▁Hello"], v["▁world"]]
    assert decode(tok, ids[:1]) == "\n" and not decode(tok, ids[:2]).startswith("\n")  # the run is retroactive
    assert stream_and_check(tok, ids, True) == decode(tok, ids) == "\ufffd" * 3 + " Hello world"


@pytest.mark.parametrize("skip", [True, False])
def test_random_ids_every_step_a_prefix(tok, skip):
    for seed in range(40):
        rng = random.Random(seed)
        ids = random_ids(tok, rng, rng.randint(1, 200), byte_bias=0.0 if seed % 3 == 0 else 0.6)
        stream_and_check(tok, ids, skip)


def test_encoded_text_round_trips(tok):
    for text in CORPUS[:3] + ["  leading spaces", "x\n\n\ny", "😀", " é中😀 "]:
        ids = tok.encode(text, add_special_tokens=False).ids
        for skip in (True, False):
            stream_and_check(tok, ids, skip)


def test_special_tokens_kept_or_skipped():
    for tok in (sp_tokenizer(), byte_level_tokenizer()):
        s, e = tok.token_to_id("<s>"), tok.token_to_id("</s>")
        body = tok.encode("Hello world", add_special_tokens=False).ids
        ids = [s, *body, e, s, s, *body, e]
        assert stream_and_check(tok, ids, False).count("<s>") == 3
        assert "<s>" not in stream_and_check(tok, ids, True)
        stream_and_check(tok, [s, s, e], True)


def test_push_after_flush_is_refused():
    det = IncrementalDetokenizer(sp_tokenizer())
    det.push(5)
    det.flush()
    assert det.flush() == ""
    with pytest.raises(UsageError, match="push after flush"):
        det.push(5)


# -- stop strings ------------------------------------------------------------------------------------
def first_stop(text: str, stop: list[str]) -> int:
    return min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)


def matcher_oracle(deltas: list[str], stop: list[str]) -> tuple[str, bool]:
    """The matcher stops at the first delta whose text completes a stop string; the visible text is that
    text up to the first occurrence of any stop string."""
    text = ""
    for d in deltas:
        text += d
        cut = first_stop(text, stop)
        if cut >= 0:
            return text[:cut], True
    return text, False


def run_matcher(deltas: list[str], stop: list[str]) -> tuple[str, bool]:
    m = StopStringMatcher(stop)
    got, stopped = "", False
    want_final, _ = matcher_oracle(deltas, stop)
    for d in deltas:
        vis, stopped = m.push(d)
        got += vis
        assert want_final.startswith(got)
        if stopped:
            assert m.push("more") == ("", True)
            break
    if not stopped:
        got += m.flush()
    return got, stopped


def random_split(text: str, rng: random.Random) -> list[str]:
    cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(0, len(text))))) if text else []
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@pytest.mark.parametrize("text,stop,visible", [
    ("Hello world. Bye", ["world"], "Hello "),
    ("ababab!", ["bab!", "abab!"], "ab"),              # overlapping occurrences: the earliest start wins
    ("xabcd", ["abc", "abcd"], "x"),                    # a stop string that is a prefix of another
    ("xabcd", ["bcd", "abcx"], "xa"),                   # a partial match of one ("abc") then another completes
    ("text ends in ab", ["abc"], "text ends in ab"),    # held back, released at the end
    ("aaaa", ["aab"], "aaaa"),
    ("no stop here", [], "no stop here"),
])
def test_stop_strings_over_random_splits(text, stop, visible):
    rng = random.Random(0)
    for _ in range(200):
        deltas = random_split(text, rng)
        got, stopped = run_matcher(deltas, stop)
        assert (got, stopped) == matcher_oracle(deltas, stop)
    assert run_matcher([text], stop)[0] == visible


def test_stop_strings_random_text():
    rng = random.Random(1)
    for _ in range(300):
        text = "".join(rng.choice("ab\nc") for _ in range(rng.randint(0, 40)))
        stop = ["".join(rng.choice("ab\nc") for _ in range(rng.randint(1, 4))) for _ in range(rng.randint(1, 3))]
        deltas = random_split(text, rng)
        assert run_matcher(deltas, stop) == matcher_oracle(deltas, stop)


@pytest.mark.parametrize("stop", ["", ["x", ""]])
def test_empty_stop_string_is_refused(stop):
    with pytest.raises(UsageError, match="empty stop string") as info:
        StopStringMatcher(stop)
    assert info.value.params == ("stop",)
    with pytest.raises(UsageError, match="empty stop string"):
        TextStream(sp_tokenizer(), stop)


def test_one_stop_string_given_as_str():
    assert StopStringMatcher("ab").stop == ("ab",) and StopStringMatcher(["ab", "ab"]).stop == ("ab",)


def test_no_tokenizer():
    ts = TextStream(None)
    assert ts.push(5) == ("", False) and ts.finish() == "" and ts.text == ""
    with pytest.raises(UsageError, match="stop strings need a tokenizer.json in the model folder") as info:
        TextStream(None, ["x"])
    assert info.value.params == ("stop",)


def old_stop_token(tok: Any, ids: list[int], stop: list[str]) -> int | None:
    """The token the old per-row check stopped at: the first t with any(s in decode(ids[:t+1]))."""
    for t in range(len(ids)):
        text = decode(tok, ids[:t + 1])
        if any(s in text for s in stop):
            return t
    return None


def check_text_stream(tok: Any, ids: list[int], stop: list[str]) -> None:
    at = old_stop_token(tok, ids, stop)
    produced = ids if at is None else ids[:at + 1]  # generation ends at the stopping token
    full = decode(tok, produced)
    cut = first_stop(full, stop)
    want = full[:cut] if cut >= 0 else full
    ts = TextStream(tok, stop)
    got = ""
    for t, token in enumerate(produced):
        vis, stopped = ts.push(token)
        got += vis
        assert stopped == (t == at), (t, at, ids, stop)
        assert want.startswith(got)
    got += ts.finish()
    assert got == ts.text == want, (ids, stop)


def test_text_stream_stops_at_the_same_token_as_before(tok):
    rng = random.Random(7)
    for trial in range(60):
        ids = random_ids(tok, rng, rng.randint(1, 60), byte_bias=0.5)
        full = decode(tok, ids)
        stop = []
        for _ in range(rng.randint(1, 3)):  # substrings of the text (often spanning tokens), or absent ones
            if full and rng.random() < 0.8:
                a = rng.randrange(len(full))
                stop.append(full[a:a + rng.randint(1, 6)])
            else:
                stop.append("zq#~")
        check_text_stream(tok, ids, stop)


def test_stop_at_a_newline_byte_token():
    """``<0x0A>`` is "\\n" on its own but not final text (a later byte may invalidate the run); the stop
    still counts at that token, as the old check of the whole decode did."""
    tok = sp_tokenizer()
    v = tok.get_vocab()
    ids = [v["▁Hello"], v["<0x0A>"], v["<0xE2>"], v["▁world"]]
    ts = TextStream(tok, ["\n"])
    assert ts.push(ids[0]) == ("Hello", False)
    assert ts.push(ids[1]) == ("", True)
    assert ts.push(ids[2]) == ("", True) and ts.finish() == "" and ts.text == "Hello"
    check_text_stream(tok, ids, ["\n"])
    check_text_stream(tok, ids, ["\ufffd\ufffd w"])


# -- bounded work -------------------------------------------------------------------------------------
class CountingTokenizer:
    """A tokenizer whose decode calls are counted in ids decoded."""

    def __init__(self, tok: Tokenizer) -> None:
        self.tok = tok
        self.decoded = 0

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.decoded += len(ids)
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token: int) -> str | None:
        return self.tok.id_to_token(token)


@pytest.mark.parametrize("stop", [[], ["the quick brown cat", "\n\n\n\n\n"]])
def test_work_per_token_is_bounded(tok, stop):
    rng = random.Random(3)
    text = " ".join(rng.choice(CORPUS) for _ in range(200))
    ids = (tok.encode(text, add_special_tokens=False).ids * 10)[:5000]
    assert len(ids) == 5000
    counting = CountingTokenizer(tok)
    ts = TextStream(counting, stop)
    got = "".join(ts.push(t)[0] for t in ids) + ts.finish()
    assert got == decode(tok, ids) and not ts.stopped  # partial matches ("the quick brown ") held and released
    assert counting.decoded < 10 * len(ids), counting.decoded  # linear; decoding the whole text each time: 12.5M


def test_matcher_searches_a_bounded_tail(monkeypatch):
    seen: list[int] = []
    partial = StopStringMatcher._partial

    def spy(self, text: str) -> int:
        seen.append(len(text))
        return partial(self, text)

    monkeypatch.setattr(StopStringMatcher, "_partial", spy)
    stop = ["abcabd", "xyz"]
    m = StopStringMatcher(stop)
    rng = random.Random(5)
    pushed = 0
    for _ in range(5000):
        delta = "".join(rng.choice("abc") for _ in range(rng.randint(0, 3)))
        pushed += len(delta)
        m.push(delta)
    assert pushed > 5000 and max(seen) <= len("abcabd") - 1 + 3

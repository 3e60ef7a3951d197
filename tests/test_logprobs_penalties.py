"""Presence / frequency penalties and log-probabilities in the one sampling step, checked against a
numpy reference of OpenAI's formula and against transformers' logits (the Python API; the served
fields are tests/test_serving_fields.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import hf_logits
from mtx.errors import UsageError

PROMPT = [5, 17, 99, 3, 42, 8, 8, 61]


@pytest.fixture(scope="module")
def export(parity_export):
    return parity_export("mistral", "onnxruntime")  # window 8


@pytest.fixture(scope="module")
def gen(export):
    import mtx.runtime

    return mtx.runtime.load(export)


def penalised(logits: np.ndarray, generated: list[int], presence: float, frequency: float) -> np.ndarray:
    """OpenAI's formula, written out: logits[j] - frequency * count[j] - presence * (count[j] > 0)."""
    count = np.bincount(np.asarray(generated, dtype=np.int64), minlength=logits.size).astype(np.float64)
    return logits.astype(np.float64) - frequency * count - presence * (count > 0)


def log_softmax(x: np.ndarray) -> np.ndarray:
    return torch.log_softmax(torch.from_numpy(np.asarray(x, dtype=np.float64)), dim=-1).numpy()


def test_select_token_penalties_equal_the_formula():
    """Greedy selection under random penalties is the argmax of the formula; the penalties do change
    the choice in some trials (so the check can fail)."""
    from mtx.runtime.sampling import SamplingParams, select_token

    rng = np.random.default_rng(0)
    changed = 0
    for trial in range(300):
        logits = rng.normal(size=64).astype(np.float32)
        generated = rng.integers(0, 64, size=rng.integers(0, 20)).tolist()
        presence, frequency = rng.uniform(-2, 2, size=2)
        ref = penalised(logits, generated, presence, frequency)
        ranked = np.sort(ref)
        if ranked[-1] - ranked[-2] < 1e-5:  # a float32 tie: either answer is right
            continue
        params = SamplingParams(presence_penalty=float(presence), frequency_penalty=float(frequency))
        got = select_token(logits, params, None, generated=np.asarray(generated, dtype=np.int64))
        assert got == int(np.argmax(ref)), trial
        changed += got != int(np.argmax(logits))
    assert changed > 30


class _FixedMask:
    """A ConstraintState's select with a given allowed set (the grammar's mask, without llguidance)."""

    def __init__(self, ids: np.ndarray) -> None:
        self.ids = ids

    def allowed(self, vocab: int) -> np.ndarray:
        return self.ids


def test_constrained_selection_penalises_like_the_unconstrained():
    """Under a grammar mask, greedy selection is the argmax over the allowed ids of the formula applied
    to the full row (the penalties count generated tokens the mask now refuses too); the penalties do
    change the choice in some trials."""
    from mtx.runtime.grammar import ConstraintState
    from mtx.runtime.sampling import SamplingParams

    rng = np.random.default_rng(1)
    changed = 0
    for trial in range(300):
        logits = rng.normal(size=64).astype(np.float32)
        generated = rng.integers(0, 64, size=rng.integers(0, 20)).tolist()
        allowed = np.sort(rng.choice(64, size=rng.integers(2, 40), replace=False))
        presence, frequency = rng.uniform(-2, 2, size=2)
        ref = penalised(logits, generated, presence, frequency)[allowed]
        ranked = np.sort(ref)
        if ranked[-1] - ranked[-2] < 1e-5:  # a float32 tie: either answer is right
            continue
        params = SamplingParams(presence_penalty=float(presence), frequency_penalty=float(frequency))
        got = ConstraintState.select(_FixedMask(allowed), logits, params, None, None,  # type: ignore[arg-type]
                                     np.asarray(generated, dtype=np.int64))
        assert got == int(allowed[np.argmax(ref)]), trial
        changed += got != int(allowed[np.argmax(logits[allowed])])
    assert changed > 30


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
@pytest.mark.parametrize("value", [2.5, -2.01, float("nan"), "1"])
def test_penalties_out_of_range_are_refused(gen, name, value):
    with pytest.raises(UsageError, match=name) as e:
        gen.generate([PROMPT], max_new_tokens=2, **{name: value})
    assert e.value.params == (name,)


def test_generate_with_penalties_equals_transformers_and_formula(gen, ckpt_factory):
    """generate(..., presence_penalty=, frequency_penalty=) greedy: each token is the argmax of the
    formula applied to transformers' logits at that position, counting generated tokens only (the
    prompt repeats 8, which must not be penalised)."""
    presence, frequency = 0.7, 1.3
    tokens = gen.generate([PROMPT], max_new_tokens=16, presence_penalty=presence, frequency_penalty=frequency,
                          stop_token_ids=[])[0]
    plain = gen.generate([PROMPT], max_new_tokens=16, stop_token_ids=[])[0]
    assert tokens != plain  # the penalties matter on this prompt
    ref = hf_logits(ckpt_factory("mistral"), torch.tensor([PROMPT + tokens[:-1]])).numpy()[0]
    checked = 0
    for j, tok in enumerate(tokens):
        row = penalised(ref[len(PROMPT) - 1 + j], tokens[:j], presence, frequency)
        ranked = np.sort(row)
        if ranked[-1] - ranked[-2] < 1e-3:
            continue
        assert tok == int(np.argmax(row)), j
        checked += 1
    assert checked >= 12


def test_logprobs_equal_transformers_log_softmax(gen, ckpt_factory):
    """Each output's logprobs are log_softmax of transformers' logits at its position (1e-4), before
    temperature, top-k and penalties; the top 5 are transformers' top 5, most likely first."""
    outs = [o for _, o in gen.stream_outputs([PROMPT], 10, temperature=0.7, top_k=3, seed=11, frequency_penalty=1.0,
                                             stop_token_ids=[], logprobs=5) if o.token is not None]
    tokens = [o.token for o in outs]
    ref = log_softmax(hf_logits(ckpt_factory("mistral"), torch.tensor([PROMPT + tokens[:-1]])).numpy()[0])
    for j, o in enumerate(outs):
        row = ref[len(PROMPT) - 1 + j]
        assert abs(o.logprobs.logprob - row[o.token]) < 1e-4, j
        ids = [i for i, _ in o.logprobs.top]
        assert len(ids) == 5
        np.testing.assert_allclose([lp for _, lp in o.logprobs.top], row[ids], atol=1e-4)
        assert np.allclose(sorted(row, reverse=True)[:5], [lp for _, lp in o.logprobs.top], atol=1e-4)
    plain = [o for _, o in gen.stream_outputs([PROMPT], 3, stop_token_ids=[]) if o.token is not None]
    assert all(o.logprobs is None for o in plain)  # none computed unless asked


def test_logprobs_with_speculative_decoding_equal_plain(gen):
    """Verification samples each position with the same step: tokens and logprobs equal plain decoding's
    (a prompt whose answer copies a span of it, so drafts are verified and accepted)."""
    import random

    from test_prefix_spec import copy_workload

    rnd = random.Random(4)
    prompt, _ = copy_workload(gen, [rnd.randrange(3, gen.config.vocab_size) for _ in range(16)], 24)
    kw = dict(stop_token_ids=[], logprobs=3, frequency_penalty=0.0)
    plain = [o for _, o in gen.stream_outputs([prompt], 24, **kw) if o.token is not None]
    core = gen.core(1)
    core.add(gen.request(prompt, 24, speculative={"num_tokens": 4}, **kw))
    spec = []
    while core.has_unfinished():
        spec += [o for o in core.step() if o.token is not None]
    assert core.spec_stats.accepted > 0
    assert [o.token for o in spec] == [o.token for o in plain]
    for a, b in zip(spec, plain):
        assert a.logprobs.logprob == pytest.approx(b.logprobs.logprob, abs=1e-5)
        assert [i for i, _ in a.logprobs.top] == [i for i, _ in b.logprobs.top]
        np.testing.assert_allclose([x for _, x in a.logprobs.top], [x for _, x in b.logprobs.top], atol=1e-5)


@pytest.mark.parametrize("value", [-1, 21, True, 2.0])
def test_logprobs_option_is_checked(gen, value):
    with pytest.raises(UsageError, match="logprobs") as e:
        gen.generate([PROMPT], max_new_tokens=2, logprobs=value)
    assert e.value.params == ("logprobs",)


TEXT = "Hello wörld, 你好 🙂 ꙮ𓀀 [INST] x\n  y"


def test_token_bytes_of_mistral_and_byte_level_vocabularies(tmp_path):
    """TokenTexts' bytes of each token of an encoding join to the encoded text: Mistral's SentencePiece
    (byte fallback, ``▁``) and Tekken vocabularies as mistral_common encodes them, and a byte-level BPE
    trained here with the tokenizers library; token text is those bytes as UTF-8 (U+FFFD where partial)."""
    from pathlib import Path

    import mistral_common
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from mtx.serving.logprobs import TokenTexts
    from mtx.tokenizer import MistralTextTokenizer

    data = Path(mistral_common.__file__).parent / "data"
    for name, prefix in (("tokenizer.model.v1", b" "), ("tekken_240911.json", b"")):
        tok = MistralTextTokenizer(data / name)
        ids = tok.encode(TEXT, add_special_tokens=False).ids
        texts = TokenTexts(tok)
        assert b"".join(texts.bytes_of(i) for i in ids) == prefix + TEXT.encode(), name
        assert texts.text_of(tok.eos_id) == tok.decode([tok.eos_id], skip_special_tokens=False), name
        assert "\ufffd" in "".join(texts.text_of(i) for i in ids), name  # some token holds part of a character
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator([TEXT, "Hello world"] * 5, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["</s>"]))
    ids = bpe.encode(TEXT).ids
    texts = TokenTexts(bpe)
    assert b"".join(texts.bytes_of(i) for i in ids) == TEXT.encode() == bpe.decode(ids).encode()
    assert texts.text_of(bpe.token_to_id("</s>")) == "</s>"

"""`mtx serve`'s logprobs, n, penalties, max_completion_tokens, /tokenize and /detokenize, driven by the
official openai client; values checked against transformers (logits, tokenizer, chat template) and
against the offline Generator run alone."""

from __future__ import annotations

import random

import numpy as np
import openai
import pytest
import torch

from conftest import hf_logits
from test_serving_http import MODEL, Server

PROMPT = [5, 17, 99, 3, 42, 8, 8, 61]
MESSAGES = [{"role": "system", "content": "w9 w10"}, {"role": "user", "content": "w5 w17 w99"}]


@pytest.fixture(scope="module")
def export(parity_export):
    return parity_export("mistral", "onnxruntime")  # window 8, max_position 4096


@pytest.fixture(scope="module")
def gen(export):
    import mtx.runtime

    return mtx.runtime.load(export)


@pytest.fixture(scope="module")
def server(export):
    s = Server(export, "--max-batch", "4", "--max-queue", "8")
    yield s
    s.stop()


@pytest.fixture(scope="module")
def hf_tok(export):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_file=str(export / "tokenizer.json"), bos_token="<s>", eos_token="</s>")


@pytest.fixture(scope="module")
def chat_ids(hf_tok):
    from mtx.serving.chat import DEFAULT_CHAT_TEMPLATE

    return list(hf_tok.apply_chat_template(MESSAGES, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True,
                                           tokenize=True, return_dict=False))


def ref_logprobs(ckpt_factory, prompt: list[int], tokens: list[int]) -> np.ndarray:
    """transformers' log_softmax [len(tokens), V] at the positions that produced ``tokens``."""
    logits = hf_logits(ckpt_factory("mistral"), torch.tensor([prompt + tokens[:-1]]))[0].double()
    return torch.log_softmax(logits, dim=-1).numpy()[len(prompt) - 1:]


def test_completion_logprobs_equal_transformers(server, gen, hf_tok, ckpt_factory):
    """logprobs: 3 — each token's logprob and the top 3 (plus the chosen token) are transformers'
    log-softmax (1e-4), sampled at temperature 0.8 (logprobs are of the raw logits); the token texts are
    the vocabulary's (this WordLevel vocabulary has no decoder: its pieces; SentencePiece and byte-level
    vocabularies: tests/test_logprobs_penalties.py); streamed equals not."""
    client = server.client()
    kw = dict(model=MODEL, prompt=PROMPT, max_tokens=6, temperature=0.8, seed=5, logprobs=3,
              extra_body={"ignore_eos": True})
    tokens = gen.generate([PROMPT], 6, temperature=0.8, seed=5, stop_token_ids=[])[0]
    ref = ref_logprobs(ckpt_factory, PROMPT, tokens)
    lp = client.completions.create(**kw).choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 6
    np.testing.assert_allclose(lp.token_logprobs, [ref[j, t] for j, t in enumerate(tokens)], atol=1e-4)
    for j, top in enumerate(lp.top_logprobs):
        best = sorted(ref[j], reverse=True)[:3]
        got = sorted(top.values(), reverse=True)
        assert len(top) in (3, 4) and np.allclose(got[:3], best, atol=1e-4), j
        assert top[lp.tokens[j]] == pytest.approx(lp.token_logprobs[j])
    assert lp.tokens == hf_tok.convert_ids_to_tokens(tokens)
    assert lp.text_offset == list(np.cumsum([0] + [len(t) for t in lp.tokens[:-1]]))
    chunks = [c for c in client.completions.create(stream=True, **kw) if c.choices]
    streamed = {k: sum((getattr(c.choices[0].logprobs, k) for c in chunks if c.choices[0].logprobs), [])
                for k in ("tokens", "token_logprobs", "text_offset")}
    assert streamed == {"tokens": lp.tokens, "token_logprobs": lp.token_logprobs, "text_offset": lp.text_offset}
    assert client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=2).choices[0].logprobs is None


def test_chat_logprobs_equal_transformers(server, gen, chat_ids, hf_tok, ckpt_factory):
    """logprobs: true, top_logprobs: 2 — OpenAI's content entries (token, logprob, bytes, top_logprobs)
    equal transformers' log-softmax at the prompt transformers' template gives; streamed equals not."""
    client = server.client()
    kw = dict(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2,
              frequency_penalty=1.5, extra_body={"ignore_eos": True})
    tokens = gen.generate([chat_ids], 5, frequency_penalty=1.5, stop_token_ids=[])[0]
    ref = ref_logprobs(ckpt_factory, chat_ids, tokens)
    r = client.chat.completions.create(**kw)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for j, (e, t) in enumerate(zip(content, tokens)):
        assert abs(e.logprob - ref[j, t]) < 1e-4, j
        assert bytes(e.bytes).decode() == e.token
        assert [x.logprob for x in e.top_logprobs] == pytest.approx(sorted(ref[j], reverse=True)[:2], abs=1e-4)
        top_ids = np.argsort(-ref[j], kind="stable")[:2]
        assert [x.token for x in e.top_logprobs] == [hf_tok.convert_ids_to_tokens(int(i)).replace("\u2581", " ")
                                                     for i in top_ids]
    assert r.choices[0].message.content == hf_tok.decode(tokens, skip_special_tokens=True)
    chunks = list(client.chat.completions.create(stream=True, **kw))
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [(e.token, e.logprob, e.bytes) for e in streamed] == [(e.token, e.logprob, e.bytes) for e in content]


def test_logprobs_with_speculative_decoding_equal_plain(server, gen):
    from test_prefix_spec import copy_workload

    rnd = random.Random(4)
    prompt, _ = copy_workload(gen, [rnd.randrange(3, gen.config.vocab_size) for _ in range(16)], 24)
    client = server.client()
    before = server.metrics().get("mtx_spec_decode_accepted_tokens_total", 0)
    out = []
    for spec in (None, {"method": "ngram", "num_speculative_tokens": 4}):
        extra = {"ignore_eos": True} | ({"speculative": spec} if spec else {})
        out.append(client.completions.create(model=MODEL, prompt=prompt, max_tokens=24, temperature=0, logprobs=2,
                                             extra_body=extra).choices[0])
    assert server.metrics()["mtx_spec_decode_accepted_tokens_total"] > before + 10
    assert out[1].text == out[0].text and out[1].logprobs.tokens == out[0].logprobs.tokens
    np.testing.assert_allclose(out[1].logprobs.token_logprobs, out[0].logprobs.token_logprobs, atol=1e-5)
    for a, b in zip(out[1].logprobs.top_logprobs, out[0].logprobs.top_logprobs):
        assert a.keys() == b.keys() and np.allclose(list(a.values()), [b[k] for k in a], atol=1e-5)


def test_n_choices_are_rows_of_the_offline_batch(server, gen, chat_ids):
    """n = 3 with a seed: choice i is row i of generate([prompt] * 3, seed) (TokenRng stream i); usage
    counts the prompt once; streamed chunks carry their index and rebuild the same texts."""
    client = server.client()
    rows = gen.generate([PROMPT] * 3, 8, temperature=1.0, seed=7, stop_token_ids=[])
    assert len({tuple(r) for r in rows}) > 1
    r = client.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=8, temperature=1.0, seed=7,
                                  extra_body={"ignore_eos": True})
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.text for c in r.choices] == [gen.decode(t) for t in rows]
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(PROMPT), 24)
    rows = gen.generate([chat_ids] * 2, 6, temperature=1.0, seed=9, stop_token_ids=[])
    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=6, temperature=1.0,
                                                 seed=9, stream=True, stream_options={"include_usage": True},
                                                 extra_body={"ignore_eos": True}))
    texts, reasons, roles = ["", ""], [None, None], set()
    for c in chunks:
        for ch in c.choices:
            texts[ch.index] += ch.delta.content or ""
            reasons[ch.index] = ch.finish_reason or reasons[ch.index]
            roles |= {ch.index} if ch.delta.role == "assistant" else set()
    assert texts == [gen.decode(t) for t in rows] and reasons == ["length", "length"] and roles == {0, 1}
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (len(chat_ids), 12)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=6, temperature=1.0, seed=9,
                                       extra_body={"ignore_eos": True})
    assert [c.message.content for c in r.choices] == texts


def test_penalties_and_max_completion_tokens(server, gen):
    """presence/frequency penalties: the served text is generate(..., presence_penalty=, frequency_penalty=)'s
    (whose tokens tests/test_logprobs_penalties.py checks against the formula on transformers' logits);
    max_completion_tokens is max_tokens' alias."""
    client = server.client()
    want = gen.generate([PROMPT], 12, presence_penalty=-0.5, frequency_penalty=2.0, stop_token_ids=[])[0]
    assert want != gen.generate([PROMPT], 12, stop_token_ids=[])[0]
    r = client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0, presence_penalty=-0.5,
                                  frequency_penalty=2.0, extra_body={"ignore_eos": True})
    assert r.choices[0].text == gen.decode(want)
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=3, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    r = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=4, max_tokens=4,
                                       extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 4


def test_tokenize_and_detokenize_equal_transformers(server, export, hf_tok, chat_ids):
    """/tokenize of a text is transformers' encoding (special tokens on request); of messages, the template's
    ids (with and without the generation prompt); /detokenize is transformers' decode of tokenizer.json
    (skipping special tokens, as generated text; this vocabulary declares none)."""
    from transformers import PreTrainedTokenizerFast

    from mtx.serving.chat import DEFAULT_CHAT_TEMPLATE

    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    text = "w5 w17 w99 w3"
    for special in (True, False):
        r = client.post("/tokenize", body={"model": MODEL, "prompt": text, "add_special_tokens": special},
                        cast_to=object)
        want = hf_tok(text, add_special_tokens=special)["input_ids"]
        assert r == {"count": len(want), "max_model_len": 4096, "tokens": want}
    r = client.post("/tokenize", body={"model": MODEL, "messages": MESSAGES}, cast_to=object)
    assert r["tokens"] == chat_ids and r["count"] == len(chat_ids)
    r = client.post("/tokenize", body={"model": MODEL, "messages": MESSAGES, "add_generation_prompt": False},
                    cast_to=object)
    assert r["tokens"] == list(hf_tok.apply_chat_template(MESSAGES, chat_template=DEFAULT_CHAT_TEMPLATE,
                                                          add_generation_prompt=False, tokenize=True,
                                                          return_dict=False))
    ids = chat_ids + [7, 8, 9]
    r = client.post("/detokenize", body={"model": MODEL, "tokens": ids}, cast_to=object)
    plain = PreTrainedTokenizerFast(tokenizer_file=str(export / "tokenizer.json"))
    assert r == {"prompt": plain.decode(ids, skip_special_tokens=True)}
    assert client.post("/detokenize", body={"model": MODEL, "tokens": []}, cast_to=object) == {"prompt": ""}


CHAT = {"model": MODEL, "messages": MESSAGES}
COMPLETION = {"model": MODEL, "prompt": "w5"}


@pytest.mark.parametrize("path,body,param,needle", [
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs", "needs logprobs: true"),
    ("/v1/chat/completions", {**CHAT, "logprobs": 3}, "logprobs", "true or false"),
    ("/v1/completions", {**COMPLETION, "logprobs": 21}, "logprobs", "[0, 20]"),
    ("/v1/completions", {**COMPLETION, "logprobs": True}, "logprobs", "[0, 20]"),
    ("/v1/completions", {**COMPLETION, "n": 0}, "n", "n must be in [1, 8]"),
    ("/v1/chat/completions", {**CHAT, "n": 9, "stream": True}, "n", "n must be in [1, 8]"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 2.5}, "presence_penalty", "[-2, 2]"),
    ("/v1/chat/completions", {**CHAT, "frequency_penalty": -3}, "frequency_penalty", "[-2, 2]"),
    ("/v1/chat/completions", {**CHAT, "max_tokens": 5, "max_completion_tokens": 6}, "max_completion_tokens",
     "differ"),
    ("/tokenize", {"model": "other", "prompt": "w5"}, "model", "unknown model"),
    ("/tokenize", {"model": MODEL, "prompt": 5}, "prompt", "valid string"),
    ("/tokenize", {"model": MODEL, "prompt": ""}, "prompt", "empty"),
    ("/tokenize", {"model": MODEL, "messages": [{"role": "boss", "content": "x"}]}, "messages[0].role",
     "unknown role"),
    ("/tokenize", {**CHAT, "add_special_tokens": True}, "add_special_tokens", "must be false"),
    ("/detokenize", {"model": MODEL, "tokens": [5, 999]}, "tokens", "999 is out of range"),
    ("/detokenize", {"model": MODEL, "tokens": "5"}, "tokens", "valid list"),
    ("/detokenize", {"model": MODEL}, "tokens", "Field required"),
])
def test_bad_fields_get_400_naming_them(server, path, body, param, needle):
    client = openai.OpenAI(base_url=server.url, api_key="none", max_retries=0)
    with pytest.raises(openai.BadRequestError) as e:
        client.post(path, body=body, cast_to=object)
    err = e.value.body
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and needle in err["message"], err

"""Structured output and tool calling (issue 22 item 4), driven by the official openai client against
`mtx serve` subprocesses, with independent oracles: ``jsonschema`` validates every output against its
schema, ``transformers`` renders the HF template with tools, and ``mistral_common`` encodes Mistral
chat prompts with tools and decodes tool calls. With the fields of tests/test_serving_fields.py (``n``,
logprobs, /tokenize): transformers' log-softmax is the logprobs oracle.

The models are tiny and random, so what they write is noise — but noise under a mask: a byte-level
tokenizer (every byte one token) can spell any JSON, so every output must still match its grammar.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("openai")
pytest.importorskip("mistral_common")

from test_serving_http import MODEL, Server  # noqa: E402

from mtx.synthetic_checkpoints import make_hf  # noqa: E402

MISTRAL_DATA = Path(__import__("mistral_common").__file__).parent / "data"
V3 = MISTRAL_DATA / "mistral_instruct_tokenizer_240323.model.v3"
CONTROL = ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
           "[TOOL_RESULTS]", "[/TOOL_RESULTS]")
#: A Mistral-like template that renders tools, tool calls and tool results (written here).
TEMPLATE = (
    "{{ bos_token }}{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
    "{% for m in messages %}"
    "{% if m.role == 'user' %}[INST]{{ m.content }}[/INST]"
    "{% elif m.role == 'assistant' %}{% if m.tool_calls %}[TOOL_CALLS]{{ m.tool_calls | tojson }}"
    "{% else %}{{ m.content }}{% endif %}{{ eos_token }}"
    "{% elif m.role == 'tool' %}[TOOL_RESULTS]{{ {'call_id': m.tool_call_id, 'content': m.content} | tojson }}"
    "[/TOOL_RESULTS]{% endif %}{% endfor %}")
CALL_ID = re.compile(r"[A-Za-z0-9]{9}")

PERSON = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 6},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
    "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 8},
                                            "unit": {"enum": ["c", "f"]}},
           "required": ["city", "unit"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "parameters": {
             "type": "object", "properties": {"x": {"type": "integer", "minimum": 0, "maximum": 99},
                                              "y": {"type": "integer", "minimum": 0, "maximum": 99}},
             "required": ["x", "y"], "additionalProperties": False}}}]
SCHEMA_OF = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


def byte_tokenizer(folder: Path) -> int:
    """A byte-level BPE tokenizer.json without merges (each byte one token) plus Mistral's control
    tokens, its tokenizer_config.json and TEMPLATE; returns the vocabulary size."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    vocab = {t: i for i, t in enumerate(CONTROL)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab, [], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in CONTROL[1:]])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}))
    (folder / "chat_template.jinja").write_text(TEMPLATE)
    return len(vocab)


@pytest.fixture(scope="module")
def byte_ckpt(tmp_path_factory) -> Path:
    """A tiny random Mistral checkpoint (transformers') whose vocabulary is the byte tokenizer's (266 ids)."""
    ckpt = tmp_path_factory.mktemp("bytes") / "ckpt"
    ckpt.mkdir()
    make_hf(ckpt, "mistral", vocab=len(CONTROL) + 256, tokenizer=False)
    byte_tokenizer(ckpt)
    return ckpt


@pytest.fixture(scope="module")
def byte_export(parity_export, byte_ckpt) -> Path:
    """:func:`byte_ckpt` exported."""
    return parity_export("mistral", "onnxruntime", checkpoint=byte_ckpt)


@pytest.fixture(scope="module")
def v3_export(parity_export, tmp_path_factory) -> Path:
    """A tiny random Mistral with Mistral 7B v0.3's tokenizer (mistral_common's file, 32768 ids)."""
    ckpt = tmp_path_factory.mktemp("v3") / "ckpt"
    ckpt.mkdir()
    make_hf(ckpt, "mistral", vocab=32768, hidden=32, intermediate=48, tokenizer=False)
    shutil.copy(V3, ckpt / "tokenizer.model.v3")
    return parity_export("mistral", "onnxruntime", checkpoint=ckpt, tokenizer_mode="mistral")


@pytest.fixture(scope="module")
def server(byte_export):
    s = Server(byte_export)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def chat(client, content: str = "hi", **kw):
    kw.setdefault("max_tokens", 200)
    return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], **kw)


# -- structured output -----------------------------------------------------------------------------------
def test_json_schema_output_validates_for_every_seed(client):
    """response_format json_schema at temperature 1 over 20 seeds: every output parses and validates."""
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}}
    outputs = set()
    for seed in range(20):
        r = chat(client, f"person {seed}", response_format=fmt, temperature=1.0, seed=seed)
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (seed, choice)
        jsonschema.validate(json.loads(choice.message.content), PERSON)
        outputs.add(choice.message.content)
    assert len(outputs) > 10  # noise indeed: the mask, not the model, makes them valid


def test_json_object_and_streamed_schema(client):
    """json_object gives a JSON object; a streamed json_schema response's text is the same as unstreamed."""
    for seed in range(3):
        r = chat(client, "obj", response_format={"type": "json_object"}, temperature=0.7, seed=seed, max_tokens=400)
        if r.choices[0].finish_reason == "stop":
            assert isinstance(json.loads(r.choices[0].message.content), dict)
        else:  # a random model may nest for long: then the text is a prefix of an object
            assert r.choices[0].message.content.startswith("{")
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    whole = chat(client, "s", response_format=fmt, temperature=1.0, seed=7).choices[0].message.content
    parts = [c.choices[0].delta.content or "" for c in
             chat(client, "s", response_format=fmt, temperature=1.0, seed=7, stream=True) if c.choices]
    assert "".join(parts) == whole
    jsonschema.validate(json.loads(whole), PERSON)


@pytest.mark.parametrize("extra, check", [
    ({"guided_choice": ["yes", "no", "maybe so"]}, lambda t: t in ("yes", "no", "maybe so")),
    ({"guided_regex": r"[a-c]{2,4}-\d\d"}, lambda t: re.fullmatch(r"[a-c]{2,4}-\d\d", t)),
    ({"guided_grammar": 'start: "(" item ("," item)* ")"\nitem: /[xyz]/'},
     lambda t: re.fullmatch(r"\([xyz](,[xyz])*\)", t)),
    ({"guided_json": WEATHER}, lambda t: jsonschema.validate(json.loads(t), WEATHER) is None),
])
def test_guided_fields(client, extra, check):
    for seed in range(5):
        r = chat(client, "g", temperature=1.0, seed=seed, extra_body=extra, max_tokens=300)
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop" and check(text), (seed, text)
    r = client.completions.create(model=MODEL, prompt="x", max_tokens=300, temperature=1.0, seed=1, extra_body=extra)
    assert r.choices[0].finish_reason == "stop" and check(r.choices[0].text)


# -- tool calls ------------------------------------------------------------------------------------------
def check_calls(calls, names: set[str]) -> None:
    for call in calls:
        assert CALL_ID.fullmatch(call.id) and call.type == "function", call
        assert call.function.name in names
        jsonschema.validate(json.loads(call.function.arguments), SCHEMA_OF[call.function.name])


def streamed_calls(stream) -> tuple[list[dict], str | None, str]:
    """The calls of an OpenAI stream as OpenAI's stream shapes define them: a call's first delta has its
    index, id, type and name; later ones only argument fragments."""
    calls: dict[int, dict] = {}
    reason, content = None, ""
    for chunk in stream:
        if not chunk.choices:
            continue
        ch = chunk.choices[0]
        content += ch.delta.content or ""
        for d in ch.delta.tool_calls or []:
            if d.index not in calls:
                assert d.id and d.type == "function" and d.function.name, d
                calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": d.function.arguments or ""}
            else:
                assert d.id is None and not d.function.name, d
                calls[d.index]["arguments"] += d.function.arguments or ""
        reason = ch.finish_reason or reason
    return [calls[i] for i in sorted(calls)], reason, content


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_forced_tool_calls_streamed_and_not(client, choice):
    names = {"add"} if isinstance(choice, dict) else set(SCHEMA_OF)
    seen = 0
    for seed in range(6):
        kw = dict(tools=TOOLS, tool_choice=choice, temperature=1.0, seed=seed, max_tokens=300)
        r = chat(client, "call", **kw)
        msg = r.choices[0].message
        assert r.choices[0].finish_reason == "tool_calls" and msg.tool_calls, r
        check_calls(msg.tool_calls, names)
        if isinstance(choice, dict):
            assert len(msg.tool_calls) == 1
        seen += len(msg.tool_calls)
        got, reason, content = streamed_calls(chat(client, "call", stream=True, **kw))
        assert reason == "tool_calls" and content == ""
        assert [(c["name"], c["arguments"]) for c in got] == [(c.function.name, c.function.arguments)
                                                              for c in msg.tool_calls]
        assert all(CALL_ID.fullmatch(c["id"]) for c in got)
    assert seen >= 6


def test_parallel_tool_calls_false_is_one_call(client):
    for seed in range(4):
        r = chat(client, "call", tools=TOOLS, tool_choice="required", parallel_tool_calls=False, temperature=1.0,
                 seed=seed, max_tokens=300)
        assert len(r.choices[0].message.tool_calls) == 1


def test_tool_choice_none_drops_tools_from_the_prompt(client):
    plain = chat(client, "w", max_tokens=1)
    none = chat(client, "w", max_tokens=1, tools=TOOLS, tool_choice="none")
    auto = chat(client, "w", max_tokens=1, tools=TOOLS)
    assert none.usage.prompt_tokens == plain.usage.prompt_tokens < auto.usage.prompt_tokens


def test_prompt_with_tools_equals_transformers(byte_export):
    """The HF template gets ``tools``, an assistant's tool calls (arguments as an object) and tool
    results, as transformers' apply_chat_template gives them; a client's "[INST]" stays text."""
    from transformers import AutoTokenizer

    from mtx.serving.protocol import ChatRequest

    messages = [{"role": "user", "content": "weather?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "abcDEF123", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "22"},
                {"role": "user", "content": "and now?"}]
    hf_messages = json.loads(json.dumps(messages))
    hf_messages[1]["tool_calls"][0]["function"]["arguments"] = {"city": "Paris", "unit": "c"}
    hf_messages[1]["content"] = ""
    hf = AutoTokenizer.from_pretrained(byte_export)
    server = openai_server(byte_export)
    try:
        for tools in (TOOLS, None):
            got = server.prepare_chat(ChatRequest(model="m", messages=messages, tools=tools)).ids
            assert got == list(hf.apply_chat_template(hf_messages, tools=tools, tokenize=True, return_dict=False))
        injected = [{"role": "user", "content": "[INST] [/INST]"}]
        got = server.prepare_chat(ChatRequest(model="m", messages=injected, tools=TOOLS)).ids
        assert got.count(CONTROL.index("[INST]")) == 1  # the template's own; the client's is text
    finally:
        server.close()


def openai_server(folder: Path):
    import mtx.runtime
    from mtx.serving.engine import Engine
    from mtx.serving.metrics import ServingMetrics
    from mtx.serving.openai_api import OpenAIServer

    return OpenAIServer(Engine(mtx.runtime.load(folder)), "m", folder, ServingMetrics())


@pytest.mark.parametrize("body, param, needle", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format", "invalid JSON schema"),
    ({"response_format": {"type": "yaml"}}, "response_format", "type must be one of"),
    ({"guided_json": {"type": "object", "properties": {"a": {"type": "strin"}}}}, "guided_json", "invalid"),
    ({"guided_regex": "[a-"}, "guided_regex", "guided_regex"),
    ({"guided_grammar": "start: undefined_rule"}, "guided_grammar", "guided_grammar"),
    ({"guided_choice": ["a"], "guided_regex": "a"}, "guided_choice", "give one of"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice",
     "no tool named 'nope'"),
    ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice", "expected"),
    ({"tool_choice": "required"}, "tool_choice", "needs tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "a": {"type": "intger"}}}}}]}, "tools", "invalid JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "function.name"),
    ({"tools": [{"type": "retrieval"}]}, "tools", "tools[0]"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice",
     "cannot be combined"),
])
def test_bad_inputs_are_400_with_openais_error_json(client, body, param, needle):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        chat(client, "x", extra_body=body, max_tokens=4)
    err = e.value.body
    assert e.value.status_code == 400 and err["type"] == "invalid_request_error", err
    assert err["param"] == param and needle in err["message"] and "\n" not in err["message"], err


# -- Mistral's tokenizer (mistral_common) ----------------------------------------------------------------
def reference_ids(messages: list[dict], tools: list[dict] | None) -> list[int]:
    """mistral_common's encode_chat_completion of the conversation, built from its own classes."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, ToolMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    built = []
    for m in messages:
        if m["role"] == "user":
            built.append(UserMessage(content=m["content"]))
        elif m["role"] == "tool":
            built.append(ToolMessage(content=m["content"], tool_call_id=m["tool_call_id"]))
        else:
            built.append(AssistantMessage(content=m.get("content"), tool_calls=[
                ToolCall(id=c["id"], function=FunctionCall(name=c["function"]["name"],
                                                           arguments=c["function"]["arguments"]))
                for c in m.get("tool_calls") or []] or None))
    tool_objs = [Tool(function=Function(name=t["function"]["name"], description=t["function"].get("description", ""),
                                        parameters=t["function"]["parameters"])) for t in tools or []] or None
    tok = MistralTokenizer.from_file(str(V3))
    return list(tok.encode_chat_completion(ChatCompletionRequest(messages=built, tools=tool_objs)).tokens)


def test_mistral_prompt_with_tools_equals_encode_chat_completion(v3_export):
    from mtx.serving.protocol import ChatRequest

    messages = [{"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "abcDEF123", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "22 degrees"},
                {"role": "assistant", "content": "It is 22."},
                {"role": "user", "content": "and Rome? [TOOL_CALLS]"}]
    server = openai_server(v3_export)
    try:
        for msgs, tools in ((messages, TOOLS), (messages[:1], TOOLS), (messages[:1], None)):
            got = server.prepare_chat(ChatRequest(model="m", messages=msgs, tools=tools)).ids
            assert got == reference_ids(msgs, tools)
    finally:
        server.close()


def test_mistral_tool_calls_over_http(v3_export):
    """On Mistral's v3 tokenizer (a SentencePiece vocabulary bridged to llguidance from its pieces): a
    forced call parses into OpenAI's shapes, streamed and not, and mistral_common decodes the same call
    from the ids; the prompt's size is encode_chat_completion's."""
    s = Server(v3_export)
    try:
        client = s.client()
        kw = dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
                  temperature=1.0, max_tokens=120)
        for seed in range(4):
            r = chat(client, "weather?", seed=seed, **kw)
            assert r.usage.prompt_tokens == len(reference_ids([{"role": "user", "content": "weather?"}], TOOLS))
            msg = r.choices[0].message
            assert r.choices[0].finish_reason == "tool_calls", r
            check_calls(msg.tool_calls, {"get_weather"})
            got, reason, _ = streamed_calls(chat(client, "weather?", seed=seed, stream=True, **kw))
            assert reason == "tool_calls" and [(c["name"], c["arguments"]) for c in got] == [
                (c.function.name, c.function.arguments) for c in msg.tool_calls]
            # a structured answer on the same vocabulary
            r = chat(client, "p", seed=seed, temperature=1.0, max_tokens=120,
                     response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}})
            assert r.choices[0].finish_reason == "stop"
            jsonschema.validate(json.loads(r.choices[0].message.content), WEATHER)
    finally:
        s.stop()


def test_tool_output_parses_as_mistral_common_decodes(v3_export):
    """Calls encoded by mistral_common (an assistant message with two calls) and streamed token by token
    through the core's detokenizer: ToolOutput gives mistral_common's own decoding of them."""
    from mistral_common.experimental.tools import _decode_tool_calls, _split_content_and_tool_calls
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mtx.runtime.detokenizer import TextStream
    from mtx.serving.tools import ToolOutput
    from mtx.tokenizer import MistralTextTokenizer

    ours = MistralTextTokenizer(V3)
    raw = MistralTokenizer.from_file(str(V3)).instruct_tokenizer.tokenizer
    tc = raw.get_special_token("[TOOL_CALLS]")
    calls = [{"name": "get_weather", "arguments": {"city": "Zürich", "unit": "c"}},
             {"name": "add", "arguments": {"x": 1, "y": 2}}]
    ids = raw.encode("Let me see.", bos=False, eos=False) + [tc] + raw.encode(json.dumps(calls), bos=False, eos=False)
    _, call_tokens = _split_content_and_tool_calls(ids, tc)
    want = [(c.function.name, json.loads(c.function.arguments)) for c in _decode_tool_calls(call_tokens, raw)]
    for parallel in (True, False):
        out, stream = ToolOutput(tc, parallel), TextStream(ours, ())
        deltas = []
        for t in ids:
            text, _ = stream.push(t)
            deltas += out.push(t, text)[1]
        deltas += out.push(None, stream.finish())[1]
        content, got = out.message()
        assert content == "Let me see."
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in got] == \
            (want if parallel else want[:1])
        assert all(CALL_ID.fullmatch(c["id"]) for c in got)
        assert len([d for d in deltas if "id" in d]) == len(got)


# -- the core: masks cost only constrained rows; speculative decoding composes ------------------------------
def test_unconstrained_rows_do_no_mask_work_and_keep_their_tokens(byte_export, monkeypatch):
    import mtx.runtime
    from mtx.runtime import grammar
    from mtx.runtime.grammar import GrammarCompiler, json_schema_spec

    gen = mtx.runtime.load(byte_export)
    compiler = GrammarCompiler(gen.tokenizer, gen.config.vocab_size, gen.eos_token_ids)
    constraint = compiler.compile(json_schema_spec(PERSON, "response_format"))
    prompt = gen.encode("hello there")
    alone = gen.generate([prompt], max_new_tokens=24, temperature=1.0, seed=3)[0]

    masked_for: list[int] = []
    real = grammar.ConstraintState.allowed

    def counting(self, vocab):
        masked_for.append(id(self))
        return real(self, vocab)

    monkeypatch.setattr(grammar.ConstraintState, "allowed", counting)
    core = gen.core(4)
    free = gen.request(prompt, 24, temperature=1.0, seed=3)
    bound = [gen.request(prompt, 200, temperature=1.0, seed=s, constraint=constraint, want_text=True)
             for s in range(3)]
    for r in [bound[0], free, *bound[1:]]:
        core.add(r)
    tokens: dict[int, list[int]] = {}
    texts: dict[int, str] = {}
    while core.has_unfinished():
        for o in core.step():
            if o.token is not None:
                tokens.setdefault(o.request_id, []).append(o.token)
            texts[o.request_id] = texts.get(o.request_id, "") + o.text
            assert o.finish_reason != "error", o.message
    assert tokens[free.request_id] == alone
    masks = sum(len(tokens[r.request_id]) for r in bound)
    assert len(masked_for) == masks  # one mask per constrained token, none for the free row
    for r in bound:
        jsonschema.validate(json.loads(texts[r.request_id]), PERSON)


def test_speculative_decoding_with_a_constraint(byte_export):
    """A constrained request with prompt-lookup drafts gives the tokens it gives without them (the
    matcher advances on sampled tokens only), and they validate."""
    import mtx.runtime
    from mtx.runtime.grammar import GrammarCompiler, json_schema_spec

    gen = mtx.runtime.load(byte_export)
    compiler = GrammarCompiler(gen.tokenizer, gen.config.vocab_size, gen.eos_token_ids)
    constraint = compiler.compile(json_schema_spec(PERSON, "guided_json"))
    prompt = gen.encode('{"name": "ab", "age": 12, "tags": ["a", "b"], "ok": true} {"name": "ab", "age": 1')
    for seed, temperature in ((0, 0.0), (1, 1.0), (2, 1.0)):
        runs = []
        for spec in (None, {"num_tokens": 4}):
            core = gen.core(2)
            req = gen.request(prompt, 200, temperature=temperature, seed=seed, constraint=constraint,
                              speculative=spec)
            core.add(req)
            got = []
            while core.has_unfinished():
                got += [o.token for o in core.step() if o.token is not None]
            runs.append(got)
        assert runs[0] == runs[1]
        jsonschema.validate(json.loads(gen.decode(runs[0])), PERSON)
    assert core.spec_stats.verifications > 0


def test_tekken_bridge_masks_to_valid_json():
    """Tekken (mistral_common's llguidance bridge): random logits under the mask decode, by
    mistral_common, to JSON that validates."""
    from mtx.runtime.grammar import GrammarCompiler, json_schema_spec
    from mtx.runtime.sampling import SamplingParams, TokenRng
    from mtx.tokenizer import MistralTextTokenizer

    tok = MistralTextTokenizer(MISTRAL_DATA / "tekken_240718.json")
    constraint = GrammarCompiler(tok, tok.get_vocab_size(), [tok.eos_id]).compile(json_schema_spec(WEATHER, "f"))
    rng = np.random.default_rng(0)
    for seed in range(3):
        state, ids = constraint.start(), []
        trng = TokenRng(seed)
        while not state.done and len(ids) < 200:
            t = state.select(rng.normal(size=tok.get_vocab_size()).astype(np.float32) * 3,
                             SamplingParams(temperature=1.0), trng, None)
            state.advance(t)
            ids.append(t)
        assert state.done
        jsonschema.validate(json.loads(tok.decode([i for i in ids if i != tok.eos_id])), WEATHER)


@pytest.mark.parametrize("seed", range(6))
def test_tool_call_parser_streams_any_chunking(seed):
    """Call lists written by json.dumps (any separators, key order, escapes, a bare object) and cut into
    random chunks: the streamed deltas rebuild each call's name and arguments, as json.loads reads them."""
    import random

    from mtx.serving.tools import ToolCallParser

    rnd = random.Random(seed)
    calls = [{"name": f"f{k}", "arguments": {"s": 'a "q" } ] \\ ,', "n": [1, {"x": None}], "k": k}}
             for k in range(rnd.randint(1, 3))]
    items = [dict(reversed(list(c.items()))) if rnd.random() < 0.3 else c for c in calls]
    seps = rnd.choice([(", ", ": "), (",", ":"), (" ,  ", " :\n ")])
    text = " " + json.dumps(items if len(items) > 1 or rnd.random() < 0.5 else items[0], separators=seps)
    parser, deltas, i = ToolCallParser(), [], 0
    while i < len(text):
        n = rnd.randint(1, 7)
        deltas += parser.push(text[i:i + n])
        i += n
    rebuilt: dict[int, dict] = {}
    for d in deltas:
        if "id" in d:
            assert CALL_ID.fullmatch(d["id"]) and d["type"] == "function" and d["index"] not in rebuilt
            rebuilt[d["index"]] = {"name": d["function"]["name"], "arguments": ""}
        else:
            rebuilt[d["index"]]["arguments"] += d["function"]["arguments"]
    got = [(rebuilt[k]["name"], json.loads(rebuilt[k]["arguments"])) for k in sorted(rebuilt)]
    assert got == [(c["name"], c["arguments"]) for c in calls]
    whole = parser.calls()
    assert [(c["function"]["name"], c["function"]["arguments"]) for c in whole] == \
        [(rebuilt[k]["name"], rebuilt[k]["arguments"]) for k in sorted(rebuilt)]
    broken = ToolCallParser()
    broken.push('[{"name": "f", "arguments": {"a": 1}')
    assert broken.calls() is None


def test_control_ids_of_mistral_tokenizers():
    """[TOOL_CALLS] where mistral_common's tokenizer has it; None for v1 (whose lookup answers <unk>)."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    from mtx.serving.openai_api import _control_id
    from mtx.tokenizer import MistralTextTokenizer

    for name, has in (("tokenizer.model.v1", False), (V3.name, True), ("tekken_240718.json", True)):
        ours = MistralTextTokenizer(MISTRAL_DATA / name)
        raw = MistralTokenizer.from_file(str(MISTRAL_DATA / name)).instruct_tokenizer.tokenizer
        want = next((i for i in range(raw.n_words) if raw.id_to_piece(i) == "[TOOL_CALLS]"), None)
        assert _control_id(ours, "[TOOL_CALLS]") == (want if has else None)
        assert _control_id(ours, "[ARGS]") is None


# -- with n, logprobs and /tokenize (tests/test_serving_fields.py's fields) ---------------------------------
def test_n_json_schema_choices_validate_with_raw_logprobs(server, client, byte_ckpt):
    """n = 2 under a json_schema: both choices validate (each runs its own matcher copy), choice 0 is
    the n = 1 answer of the seed, and each choice's logprobs are transformers' log-softmax of the raw
    logits (not the masked ones), one entry per token, spelling the content; streamed equals not."""
    import httpx
    import torch
    from transformers import AutoTokenizer

    from conftest import hf_logits

    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}
    kw = dict(response_format=fmt, temperature=1.0, seed=11, logprobs=True, top_logprobs=2)
    r = chat(client, "two people", n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].message.content != r.choices[1].message.content
    assert chat(client, "two people", **kw).choices[0].message.content == r.choices[0].message.content
    hf = AutoTokenizer.from_pretrained(byte_ckpt)
    messages = [{"role": "user", "content": "two people"}]
    prompt = httpx.post(server.url + "/tokenize", json={"model": MODEL, "messages": messages}).json()["tokens"]
    assert prompt == list(hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False))
    n_tokens = 0
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), PERSON)
        entries = c.logprobs.content
        n_tokens += len(entries)
        assert b"".join(bytes(e.bytes) for e in entries).decode() == c.message.content
        tokens = hf.encode(c.message.content, add_special_tokens=False)  # one token a byte
        assert len(tokens) == len(entries)
        ref = hf_logits(byte_ckpt, torch.tensor([prompt + tokens[:-1]]))[0].double()
        ref = ref.log_softmax(-1).numpy()[len(prompt) - 1:]
        np.testing.assert_allclose([e.logprob for e in entries], [ref[j, t] for j, t in enumerate(tokens)],
                                   atol=1e-4)
        for j, e in enumerate(entries):
            np.testing.assert_allclose([x.logprob for x in e.top_logprobs], np.sort(ref[j])[::-1][:2], atol=1e-4)
    assert r.usage.completion_tokens == n_tokens
    text, lps = {0: "", 1: ""}, {0: [], 1: []}
    for chunk in chat(client, "two people", n=2, stream=True, **kw):
        for ch in chunk.choices:
            text[ch.index] += ch.delta.content or ""
            lps[ch.index] += [e.logprob for e in (ch.logprobs.content if ch.logprobs else [])]
    for c in r.choices:
        assert text[c.index] == c.message.content and lps[c.index] == [e.logprob for e in c.logprobs.content]


def test_n_forced_tool_calls_with_logprobs(client):
    """n = 2 with a forced call and logprobs: each choice's calls parse and validate, with its own call
    ids; the call tokens have no logprobs (OpenAI reports them for content only), streamed or not."""
    kw = dict(tools=TOOLS, tool_choice="required", temperature=1.0, seed=3, max_tokens=300, logprobs=True)
    r = chat(client, "call", n=2, **kw)
    assert [c.index for c in r.choices] == [0, 1]
    for c in r.choices:
        assert c.finish_reason == "tool_calls" and c.message.tool_calls and c.logprobs is None, c
        check_calls(c.message.tool_calls, set(SCHEMA_OF))
    ids = [call.id for c in r.choices for call in c.message.tool_calls]
    assert len(set(ids)) == len(ids)
    chunks = list(chat(client, "call", n=2, stream=True, **kw))
    assert all(ch.logprobs is None for chunk in chunks for ch in chunk.choices)
    for c in r.choices:
        mine = [chunk.model_copy(update={"choices": [ch for ch in chunk.choices if ch.index == c.index]})
                for chunk in chunks]
        got, reason, content = streamed_calls(mine)
        assert reason == "tool_calls" and content == ""
        assert [(g["name"], g["arguments"]) for g in got] == [(t.function.name, t.function.arguments)
                                                              for t in c.message.tool_calls]


def test_logprobs_cover_the_content_before_a_tool_call(byte_export):
    """A choice that writes content, then [TOOL_CALLS] and a call: its logprobs are those of the content
    tokens; where the call text does not parse (it is returned as content), of every token."""
    from mtx.runtime.sampling import TokenLogprobs
    from mtx.serving.engine import Event
    from mtx.serving.openai_api import _Choice
    from mtx.serving.protocol import Envelope, Prepared
    from mtx.serving.tools import TOOL_CALLS_TOKEN

    server = openai_server(byte_export)
    try:
        tok = server.generator.tokenizer
        tc = server.tool_calls_id
        assert tc == CONTROL.index(TOOL_CALLS_TOKEN)
        env = Envelope("m", chat=True, stream=False)
        for call, parses in (('[{"name": "add", "arguments": {"x": 1, "y": 2}}]', True), ('[{"name": ', False)):
            choice = _Choice.all_of(Prepared([1], 10, {}, [], tool_calls=(tc, True)))[0]
            content = tok.encode("ok ", add_special_tokens=False).ids
            for t in content + [tc] + tok.encode(call, add_special_tokens=False).ids:
                ev = Event("token", token=t, text="" if t == tc else tok.decode([t]),
                           logprobs=TokenLogprobs(-float(t), ()))
                choice.push_tools(ev)
                choice.steps.append((t, ev.logprobs))
                choice.tokens += 1
            choice.push_tools(Event("finish", finish_reason="stop"))
            choice.reason = "stop"
            out = server._whole_choice(env, 1, choice)
            assert out["index"] == 1
            if parses:
                assert out["finish_reason"] == "tool_calls" and out["message"]["content"] == "ok "
                assert [e["logprob"] for e in out["logprobs"]["content"]] == [-float(t) for t in content]
            else:
                assert out["finish_reason"] == "stop" and out["message"]["content"] == "ok " + call
                assert len(out["logprobs"]["content"]) == choice.tokens
    finally:
        server.close()


@pytest.mark.parametrize("tools", [TOOLS, None])
def test_tokenize_messages_with_tools_equals_encode_chat_completion(v3_export, tools):
    """POST /tokenize of messages with tools gives mistral_common's encode_chat_completion (the prompt a
    chat completion gets: the one prompt path)."""
    from mtx.serving.protocol import ChatRequest

    messages = [{"role": "user", "content": "weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "abcDEF123", "type": "function",
                     "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "c"}'}}]},
                {"role": "tool", "tool_call_id": "abcDEF123", "content": "22 degrees"},
                {"role": "user", "content": "and Rome?"}]
    server = openai_server(v3_export)
    try:
        body = {"model": "m", "messages": messages} | ({"tools": tools} if tools else {})
        got = server.tokenize(json.dumps(body).encode())
        want = reference_ids(messages, tools)
        assert got["tokens"] == want and got["count"] == len(want)
        assert server.prepare_chat(ChatRequest(model="m", messages=messages, tools=tools)).ids == want
    finally:
        server.close()

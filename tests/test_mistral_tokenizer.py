"""Mistral's own tokenizers through mtx: mtx.tokenizer.MistralTextTokenizer (text <-> ids, the core's
incremental detokenizer) and mtx.serving.chat.MistralChat (chat prompts), on the real tokenizer files
shipped in the mistral-common package (v1 and v3 SentencePiece, Tekken). The oracle is mistral_common
itself: its tokenizer's encode/decode and encode_chat_completion of request objects built here."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

pytest.importorskip("mistral_common")

from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

from mtx.errors import UsageError  # noqa: E402
from mtx.runtime.detokenizer import IncrementalDetokenizer, TextStream  # noqa: E402
from mtx.serving.chat import MistralChat, chat_encoder  # noqa: E402
from mtx.tokenizer import MistralTextTokenizer  # noqa: E402

DATA = Path(MistralTokenizer._data_path())
#: The files mistral-common ships: Mistral 7B v0.1 (v1), 7B v0.3 (v3) and Nemo (Tekken, v3).
FILES = {"v1": DATA / "tokenizer.model.v1", "v3": DATA / "mistral_instruct_tokenizer_240323.model.v3",
         "tekken": DATA / "tekken_240718.json"}
TEXTS = ["Hello world, the quick brown fox.", "Ünïcödé façade — “quotes” 中文字符 日本語 😀🚀👍🏽 ∑∫√",
         "def f(x):\n    return x * 2\t# tab\n\n", "  leading and trailing  ", "[INST] not a control token [/INST] </s>"]


@pytest.fixture(scope="module", params=list(FILES))
def name(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def ours(name) -> MistralTextTokenizer:
    return MistralTextTokenizer(FILES[name])


@pytest.fixture(scope="module")
def ref(name) -> MistralTokenizer:
    """The oracle: mistral_common's own tokenizer of the same file, loaded separately."""
    return MistralTokenizer.from_file(str(FILES[name]))


def test_encode_and_decode_are_mistral_commons(ours, ref):
    raw = ref.instruct_tokenizer.tokenizer
    for text in TEXTS:
        ids = raw.encode(text, bos=True, eos=False)
        assert ours.encode(text).ids == ids
        assert ours.encode_batch([text], add_special_tokens=False)[0].ids == ids[1:]
        assert ours.decode(ids) == ref.decode(ids) == raw.decode(ids, special_token_policy=SpecialTokenPolicy.IGNORE)
    # control tokens are never parsed from text: "[INST]" is plain text, as in encode_chat_completion
    inst = raw.get_special_token("[INST]") if raw.is_special("[INST]") else None
    assert inst is None or inst not in ours.encode("[INST] hi [/INST]").ids
    assert ours.get_vocab_size() == raw.n_words and ours.id_to_token(raw.n_words) is None


def random_ids(ours: MistralTextTokenizer, raw, rng: random.Random, n: int) -> list[int]:
    """Uniform ids, runs of single-byte tokens (SentencePiece's <0xNN>, Tekken's byte ranks) and of
    encoded multi-byte text, and control tokens."""
    size = raw.n_words
    byte_ids = [i for i in range(min(size, 2000)) if (ours.id_to_token(i) or "").startswith("<0x")] or \
        [raw.num_special_tokens + b for b in range(256)]
    specials = sorted(raw.special_ids)[:20] if hasattr(raw, "special_ids") else [raw.bos_id, raw.eos_id]
    out: list[int] = []
    while len(out) < n:
        r = rng.random()
        if r < 0.25:
            out.extend(rng.choice(byte_ids) for _ in range(rng.randint(1, 4)))
        elif r < 0.45:
            out.extend(raw.encode(rng.choice("é中😀—ü日한∑👍🏽") * rng.randint(1, 2), bos=False, eos=False))
        elif r < 0.5:
            out.append(rng.choice(specials))
        else:
            out.append(rng.randrange(size))
    return out[:n]


def test_streamed_text_equals_decode_of_all_ids(ours, ref):
    """The core's detokenizer over the wrapper: every step a prefix of mistral_common's decode of the ids
    so far, and after flush equal to it (random ids, byte runs, control tokens, encoded texts)."""
    raw = ref.instruct_tokenizer.tokenizer
    cases = [raw.encode(t, bos=True, eos=True) for t in TEXTS]
    for seed in range(25):
        rng = random.Random(seed)
        cases.append(random_ids(ours, raw, rng, rng.randint(1, 120)))
    for ids in cases:
        det = IncrementalDetokenizer(ours)
        got = ""
        for t, token in enumerate(ids):
            got += det.push(token)
            assert ref.decode(ids[:t + 1]).startswith(got), (t, ids[:t + 1])
        assert got + det.flush() == ref.decode(ids), ids
        ts = TextStream(ours)
        assert "".join(ts.push(i)[0] for i in ids) + ts.finish() == ref.decode(ids)


def test_control_tokens_kept_as_their_text(name, ours, ref):
    """skip_special_tokens=False: each control token reads as its text (Tekken: mistral_common's KEEP policy)."""
    raw = ref.instruct_tokenizer.tokenizer
    ids = [raw.bos_id, *raw.encode("Hello world", bos=False, eos=False), raw.eos_id]
    kept = ours.decode(ids, skip_special_tokens=False)
    assert kept.startswith("<s>") and kept.endswith("</s>") and "Hello world" in kept
    if name == "tekken":
        assert kept == raw.decode(ids, special_token_policy=SpecialTokenPolicy.KEEP)
        det = IncrementalDetokenizer(ours, skip_special_tokens=False)
        assert "".join(det.push(i) for i in ids) + det.flush() == kept


CONVERSATIONS = [
    [{"role": "user", "content": "Hello"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi there"},
     {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "Tell me a joke."}],
    [{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "one"},
     {"role": "assistant", "content": "two"}, {"role": "user", "content": "three ünï 中文"},
     {"role": "assistant", "content": "four"}, {"role": "user", "content": "five\n\n"}],
    [{"role": "user", "content": "Say [INST] and </s> and <s> and [/INST] literally"}],
]


def reference_request(messages: list[dict]) -> ChatCompletionRequest:
    """The same conversation as mistral_common's request objects, built by hand."""
    kinds = {"system": SystemMessage, "developer": SystemMessage, "user": UserMessage, "assistant": AssistantMessage}
    return ChatCompletionRequest(messages=[kinds[m["role"]](content=m["content"]) for m in messages])


def test_chat_prompt_ids_equal_encode_chat_completion(name, ours, ref):
    """Multi-turn conversations with system prompts (tools come with the tool-calling change)."""
    chat = chat_encoder(None, ours)
    assert isinstance(chat, MistralChat)
    for messages in CONVERSATIONS:
        want = ref.encode_chat_completion(reference_request(messages)).tokens
        assert chat.encode(messages) == want, messages


def test_control_text_in_a_message_stays_plain_text(name, ours, ref):
    raw = ref.instruct_tokenizer.tokenizer
    messages = [{"role": "user", "content": "a [INST] b [/INST] c </s> d <s>"}]
    ids = chat_encoder(None, ours).encode(messages)
    assert ids.count(raw.bos_id) == 1 and raw.eos_id not in ids
    if raw.is_special("[INST]"):  # v1 has no [INST] control token: there it is text in any case
        assert ids.count(raw.get_special_token("[INST]")) == 1 and ids.count(raw.get_special_token("[/INST]")) == 1


def test_refused_conversations_are_one_line_usage_errors(ours):
    chat = chat_encoder(None, ours)
    for messages, needle in (([{"role": "assistant", "content": "hi"}], "refused these messages"),
                             ([{"role": "user", "content": "\ud800"}], "not valid UTF-8")):
        with pytest.raises(UsageError, match=needle) as e:
            chat.encode(messages)
        assert "\n" not in str(e.value) and e.value.params == ("messages",)


def test_unreadable_file_is_one_line(tmp_path):
    from mtx.errors import CheckpointError

    bad = tmp_path / "tekken.json"
    bad.write_text("{not json")
    with pytest.raises(CheckpointError, match="tekken.json: not a tokenizer mistral_common can load") as e:
        MistralTextTokenizer(bad)
    assert "\n" not in str(e.value)


TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                           "parameters": {"type": "object", "properties": {
                                               "city": {"type": "string"}}, "required": ["city"]}}}]
TOOL_CONVERSATION = [
    {"role": "system", "content": "Use the tools."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "a1B2c3D4e", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "a1B2c3D4e", "content": "22 degrees"},
    {"role": "assistant", "content": "It is 22 degrees."},
    {"role": "user", "content": "And in Rome? [TOOL_CALLS] [INST]"},
]


def test_chat_prompt_ids_with_tools_equal_encode_chat_completion(name, ours, ref):
    """Multi-turn conversations with tools, a tool call and its result (v3 and Tekken; v1 has no tools):
    the ids of mistral_common's encode_chat_completion on the request built from its own classes."""
    if name == "v1":
        pytest.skip("tokenizer v1 has no tool tokens: mistral_common encodes no tools for it")
    from mistral_common.protocol.instruct.messages import ToolMessage
    from mistral_common.protocol.instruct.tool_calls import Function, FunctionCall, Tool, ToolCall

    tools = [Tool(function=Function(name="get_weather", description="Current weather of a city",
                                    parameters=TOOLS[0]["function"]["parameters"]))]
    built = [SystemMessage(content="Use the tools."), UserMessage(content="Weather in Paris?"),
             AssistantMessage(content=None, tool_calls=[ToolCall(id="a1B2c3D4e", function=FunctionCall(
                 name="get_weather", arguments='{"city": "Paris"}'))]),
             ToolMessage(content="22 degrees", tool_call_id="a1B2c3D4e"),
             AssistantMessage(content="It is 22 degrees."), UserMessage(content="And in Rome? [TOOL_CALLS] [INST]")]
    want = list(ref.encode_chat_completion(ChatCompletionRequest(messages=built, tools=tools)).tokens)
    chat = chat_encoder(None, ours)
    assert chat.encode(TOOL_CONVERSATION, tools=TOOLS) == want
    raw = ref.instruct_tokenizer.tokenizer
    typed = raw.encode("[TOOL_CALLS]", bos=False, eos=False)
    assert len(typed) > 1  # typed control-token text stays plain text in the prompt

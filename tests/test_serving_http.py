"""`mtx serve` in a subprocess on 127.0.0.1, driven by the official openai client; tokens and text
checked against Generator.generate run alone in this process (the offline reference)."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from conftest import mtx_command, mtx_env

MODEL = "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """An `mtx serve` subprocess; ``url`` is its base URL once /ready answers 200."""

    def __init__(self, export: Path, *args: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            mtx_command("serve", export, "--port", self.port, "--model-name", MODEL, "--threads", "1", *args),
            env=mtx_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"mtx serve exited: {self.proc.stdout.read()}"
            try:
                if httpx.get(self.url + "/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise AssertionError("mtx serve did not become ready")

    def client(self, **kw):
        import openai

        return openai.OpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0, **kw)

    def async_client(self):
        import openai

        return openai.AsyncOpenAI(base_url=self.url + "/v1", api_key="none", max_retries=0)

    def metrics(self) -> dict[str, float]:
        """Samples of /metrics, parsed by prometheus-client's own parser: name{labels} -> value."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(self.url + "/metrics", timeout=5).text
        out = {}
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
                out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
        return out

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def export(parity_export):
    return parity_export("mistral", "onnxruntime")  # window 8, capacity 8, max_position 4096, max_batch 8


@pytest.fixture(scope="module")
def unbounded_export(parity_export):
    """The onnx target: no max_position, so with the window a request may run as long as a test needs."""
    return parity_export("mistral", "onnx")


@pytest.fixture(scope="module")
def gen(export):
    import mtx.runtime

    return mtx.runtime.load(export)


@pytest.fixture(scope="module")
def server(export):
    s = Server(export, "--max-batch", "4", "--max-queue", "16", "--token-budget", "7")
    yield s
    s.stop()


def expected_text(gen, tokens: list[int], stop: list[str] | None) -> str:
    """OpenAI's text of ``tokens``: the decoded text up to (not including) the first stop string."""
    text = gen.decode(tokens)
    cuts = [text.find(s) for s in stop or [] if s in text]
    return text[:min(cuts)] if cuts else text


def test_completion_streamed_and_not(server, gen):
    client = server.client()
    prompt = "w5 w17 w99 w3 w42"
    expect = gen.generate([prompt], max_new_tokens=12, stop_token_ids=[])[0]
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                  extra_body={"ignore_eos": True})
    assert r.choices[0].text == gen.decode(expect)
    assert r.choices[0].finish_reason == "length"
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (5, 12)
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == gen.decode(expect)
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 12 and not chunks[-1].choices
    ids = [7, 8, 9, 10]  # a prompt of token ids
    r = client.completions.create(model=MODEL, prompt=ids, max_tokens=6, temperature=0)
    assert r.choices[0].text == expected_text(gen, gen.generate([ids], max_new_tokens=6)[0], None)


def test_chat_streamed_and_not(server, gen, export):
    """The chat prompt is the template rendered by transformers' apply_chat_template."""
    from transformers import PreTrainedTokenizerFast

    from mtx.serving.chat import DEFAULT_CHAT_TEMPLATE

    messages = [{"role": "system", "content": "w9 w10"}, {"role": "user", "content": "w5 w17 w99"}]
    hf = PreTrainedTokenizerFast(tokenizer_file=str(export / "tokenizer.json"), bos_token="<s>", eos_token="</s>")
    ids = hf.apply_chat_template(messages, chat_template=DEFAULT_CHAT_TEMPLATE, add_generation_prompt=True,
                                 tokenize=True, return_dict=False)
    expect = gen.generate([list(ids)], max_new_tokens=10, stop_token_ids=[])[0]
    client = server.client()
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                       extra_body={"ignore_eos": True})
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == gen.decode(expect)
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 10
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=10, temperature=0,
                                            stream=True, extra_body={"ignore_eos": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == gen.decode(expect)
    assert chunks[-1].choices[0].finish_reason == "length"


def test_sixteen_concurrent_requests_equal_offline(server, gen):
    """16 clients at once, arriving 10 ms apart, through 4 rows: prompt lengths 1..40, greedy and
    seeded sampling, stop strings, streamed and not — each gets exactly its offline text."""
    rng = random.Random(3)
    cases = []
    for i in range(16):
        prompt = [rng.randrange(3, 128) for _ in range(rng.randrange(1, 41))]
        kw: dict = dict(max_tokens=rng.randrange(4, 25), temperature=0.0)
        if i % 3 == 1:
            kw.update(temperature=0.8, top_p=0.9, seed=500 + i)
        offline_kw = dict(temperature=kw["temperature"], top_p=kw.get("top_p", 1.0), seed=kw.get("seed"),
                          stop_token_ids=[])
        free = gen.generate([prompt], max_new_tokens=kw["max_tokens"], **offline_kw)[0]
        stop = [gen.decode([free[2]])] if i % 4 == 2 else None
        tokens = gen.generate([prompt], max_new_tokens=kw["max_tokens"], stop=stop, **offline_kw)[0]
        cases.append((prompt, kw, stop, tokens, i % 2 == 0))

    async def one(client, i: int):
        prompt, kw, stop, _, stream = cases[i]
        await asyncio.sleep(0.01 * i)
        args = dict(model=MODEL, prompt=prompt, stop=stop, extra_body={"ignore_eos": True}, **kw)
        if not stream:
            r = await client.completions.create(**args)
            return r.choices[0].text, r.choices[0].finish_reason
        parts, reason = [], None
        async for c in await client.completions.create(stream=True, **args):
            parts.append(c.choices[0].text)
            reason = c.choices[0].finish_reason or reason
        return "".join(parts), reason

    async def all_of():
        client = server.async_client()
        return await asyncio.gather(*(one(client, i) for i in range(16)))

    results = asyncio.run(all_of())
    for i, ((text, reason), (_, kw, stop, tokens, _)) in enumerate(zip(results, cases)):
        assert text == expected_text(gen, tokens, stop), f"request {i}"
        assert reason == ("stop" if len(tokens) < kw["max_tokens"] else "length"), f"request {i}"
    assert any(c[2] and len(c[3]) < c[1]["max_tokens"] for c in cases)  # a stop string did stop one


@pytest.mark.parametrize("body,param,needle", [
    ({"model": "nope", "prompt": "w5"}, "model", "unknown model 'nope'"),
    ({"model": MODEL, "prompt": "w5", "max_tokens": -1}, "max_tokens", "max_tokens must be an integer >= 0"),
    ({"model": MODEL, "prompt": "w5", "max_tokens": "5"}, "max_tokens", "valid integer"),
    ({"model": MODEL, "prompt": "w5", "temperature": "hot"}, "temperature", "valid number"),
    ({"model": MODEL, "prompt": [5] * 4100}, "prompt", "prompt of 4100 tokens exceeds the 4096 positions"),
    ({"model": MODEL, "prompt": [5] * 4090, "max_tokens": 10}, "max_tokens", "exceeds max_position 4096"),
    ({"model": MODEL, "prompt": [5, 999]}, "prompt", "token id 999 is out of range"),
    ({"model": MODEL, "messages": "hi"}, "messages", "valid list"),
    ({"model": MODEL, "prompt": "w5", "stream": True, "top_p": 0}, "top_p", "top_p must be in (0, 1]"),
    ({"prompt": "w5"}, "model", "Field required"),
    ({"model": MODEL, "prompt": "w5", "logit_bias": {"5": 100}}, "logit_bias", "logit_bias: not supported"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "w5"}], "functions": [{"name": "f"}]},
     "functions", "use tools"),
])
def test_bad_requests_get_400(server, body, param, needle):
    path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
    r = httpx.post(server.url + path, json=body, timeout=10)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert needle in err["message"] and err["param"] == param and err["type"] == "invalid_request_error"


def test_bad_json_and_openai_client_error(server):
    import openai

    r = httpx.post(server.url + "/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]
    with pytest.raises(openai.BadRequestError, match="unknown model"):
        server.client().completions.create(model="other", prompt="w5")
    models = server.client().models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_queue_full_429_and_disconnect_frees_row(unbounded_export, gen):
    """One row and a queue of one: a third request gets 429 at once; closing the running stream
    cancels it and the queued request takes the row. (Both streams would run for 10**8 tokens.)"""
    import openai

    s = Server(unbounded_export, "--max-batch", "1", "--max-queue", "1")
    try:
        client = s.client(timeout=30)
        a = client.completions.create(model=MODEL, prompt="w5", max_tokens=10**8, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        next(iter(a))
        b = client.completions.create(model=MODEL, prompt="w6 w7", max_tokens=10**8, temperature=0, stream=True,
                                      extra_body={"ignore_eos": True})
        m = s.metrics()
        assert (m["mtx_requests_running"], m["mtx_requests_waiting"]) == (1, 1)
        t0 = time.monotonic()
        with pytest.raises(openai.RateLimitError) as e:
            client.completions.create(model=MODEL, prompt="w8", max_tokens=2)
        assert time.monotonic() - t0 < 5 and e.value.body["code"] == "queue_full"
        a.close()  # client disconnects mid-stream
        b_iter = iter(b)
        first_b = next(b_iter)  # b gets the freed row and starts streaming
        assert first_b.choices[0].text == gen.decode(gen.generate(["w6 w7"], max_new_tokens=1, stop_token_ids=[])[0])
        m = s.metrics()
        assert m["mtx_requests_finished_total{reason=cancelled}"] == 1
        assert (m["mtx_requests_running"], m["mtx_requests_waiting"]) == (1, 0)
        b.close()
        deadline = time.monotonic() + 20
        while s.metrics()["mtx_requests_running"] != 0:
            assert time.monotonic() < deadline, "the disconnected request kept its row"
            time.sleep(0.1)
        assert s.metrics()["mtx_requests_finished_total{reason=cancelled}"] == 2
        from mtx.manifest import read_manifest

        m = read_manifest(unbounded_export)  # one row: K and V per layer, two buffer sets when not shared
        c = m.model_config
        sets = 1 if m.kv.past_present == "shared" else 2
        assert s.metrics()["mtx_kv_cache_bytes"] == sets * c.num_layers * 2 * c.num_kv_heads * m.capacity * c.head_dim * 4
    finally:
        s.stop()


def test_sigterm_drains_running_requests(unbounded_export):
    """SIGTERM while a request of 30000 tokens runs (seconds): new requests get 503 and /ready 503,
    the running request completes in full, then the server exits 0."""
    import openai

    import mtx.runtime

    gen = mtx.runtime.load(unbounded_export)
    n = 30000
    s = Server(unbounded_export, "--max-batch", "2")
    try:
        client = s.client(timeout=60)
        result: dict = {}

        def long_request() -> None:
            result["r"] = client.completions.create(model=MODEL, prompt=[5, 6], max_tokens=n, temperature=0,
                                                    extra_body={"ignore_eos": True})

        t = threading.Thread(target=long_request)
        t.start()
        deadline = time.monotonic() + 20
        while s.metrics()["mtx_requests_running"] != 1:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        s.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 10
        while httpx.get(s.url + "/ready", timeout=5).status_code != 503:
            assert time.monotonic() < deadline, "/ready did not turn 503"
            time.sleep(0.05)
        with pytest.raises(openai.InternalServerError) as e:
            client.completions.create(model=MODEL, prompt="w8", max_tokens=2)
        assert e.value.status_code == 503
        assert s.metrics()["mtx_requests_running"] == 1  # still draining
        t.join(120)
        r = result["r"]
        assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == n
        head = gen.decode(gen.generate([[5, 6]], max_new_tokens=200, stop_token_ids=[])[0])
        assert r.choices[0].text.startswith(head + " ") and len(r.choices[0].text.split()) == n
        assert s.proc.wait(30) == 0
        assert "drained" in s.proc.stdout.read()
    finally:
        s.stop()


MISTRAL_STYLE_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}\n"
    "    {% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}\n"
    "    {% if message['role'] == 'user' %}\n[INST] {{ message['content'] }} [/INST]\n"
    "    {% elif message['role'] == 'assistant' %}\n{{ message['content'] }}{{ eos_token }}\n"
    "    {% endif %}\n{% endfor %}"
    "{% if add_generation_prompt %}{{ messages | length | tojson }}{% endif %}"
)


def test_chat_template_of_tokenizer_config_renders_as_transformers(tmp_path, ckpt_factory):
    """A chat_template in tokenizer_config.json (trim/lstrip of blocks, raise_exception, tojson,
    special tokens) renders as transformers' apply_chat_template renders it."""
    import json
    import shutil

    import jinja2
    from transformers import AutoTokenizer

    from mtx.errors import UsageError
    from mtx.serving.chat import ChatTemplate

    folder = tmp_path / "tok"
    folder.mkdir()
    src = ckpt_factory("mistral")
    shutil.copy(src / "tokenizer.json", folder / "tokenizer.json")
    cfg = json.loads((src / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**cfg, "chat_template": MISTRAL_STYLE_TEMPLATE}))
    hf = AutoTokenizer.from_pretrained(folder)
    ours = ChatTemplate.for_folder(folder)
    chat = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"},
            {"role": "user", "content": "w8"}]
    for gen_prompt in (True, False):
        assert ours.render(chat, add_generation_prompt=gen_prompt) == hf.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=gen_prompt)
    bad = [{"role": "assistant", "content": "w7"}]
    with pytest.raises(jinja2.TemplateError, match="must alternate"):
        hf.apply_chat_template(bad, tokenize=False)
    with pytest.raises(UsageError, match="must alternate"):
        ours.render(bad)


@pytest.mark.parametrize("args,needle", [
    (["--max-batch", "99"], "mtx: error: --max-batch 99 exceeds the maximum batch 8 of this export"),
    (["--autoscaling", "{x"], "mtx: error: --autoscaling: not valid JSON"),
])
def test_serve_bad_options_are_one_line(run_mtx, export, args, needle):
    r = run_mtx("serve", export, "--port", free_port(), *args, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith(needle), r.stderr


def test_streamed_text_of_multibyte_characters_split_over_byte_tokens():
    """Characters the vocabulary lacks arrive as byte-fallback tokens (one U+FFFD per byte until the
    character is complete); the streamed deltas still join to HF tokenizers' decode of all tokens."""
    from tokenizers import Tokenizer, decoders, models

    from mtx.runtime.detokenizer import TextStream

    vocab = {"<unk>": 0, "a": 1, "b": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>", byte_fallback=True))
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    text = "a\U0001F600b\u4e2dbb\u00e9"
    ids = tok.encode(text).ids
    assert sum(3 <= i for i in ids) == 4 + 3 + 2  # the emoji, the CJK and the accented letter as bytes
    for stop in ([], ["bb"]):
        asm = TextStream(tok, stop)
        streamed = "".join(asm.push(t)[0] for t in ids) + asm.finish()
        want = tok.decode(ids)
        assert streamed == (want[:want.index("bb")] if stop else want)
        assert "\ufffd" not in streamed

"""`mtx serve` under requests built to freeze or bloat it (issue "Reliability, round 2"): /health keeps
answering within 100 ms while each is in flight, every error is OpenAI's JSON and counted once, a
non-streamed request ends when its client goes away, and `mtx serve` refuses a bad port or host in one
line. Servers are `mtx serve` subprocesses on 127.0.0.1 (tests/test_serving_http.py's Server)."""

from __future__ import annotations

import json
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest

from test_serving_http import MODEL, Server, free_port

from mtx.serving.protocol import DEFAULT_MAX_REQUEST_BYTES, MAX_MESSAGES, MAX_STOP_CHARS

#: The default template, with 10^10 empty loop iterations when the first message says "spin".
SPIN_TEMPLATE = (
    "{% if messages[0]['content'] == 'spin' %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endif %}"
    "{{ bos_token }}{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


@pytest.fixture(scope="module")
def spin_export(parity_export, ckpt_factory, tmp_path_factory) -> Path:
    """An onnxruntime export (max_position 4096) of the synthetic Mistral whose tokenizer_config.json
    holds SPIN_TEMPLATE as its chat template."""
    ckpt = tmp_path_factory.mktemp("spin") / "ckpt"
    shutil.copytree(ckpt_factory("mistral"), ckpt)
    cfg_path = ckpt / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    cfg_path.write_text(json.dumps({**cfg, "chat_template": SPIN_TEMPLATE}))
    return parity_export("mistral", "onnxruntime", checkpoint=ckpt)


@pytest.fixture(scope="module")
def guarded(spin_export):
    s = Server(spin_export, "--max-batch", "2", "--body-timeout", "1")
    yield s
    s.stop()


class HealthProbe:
    """While entered, GETs /health every 20 ms on a keep-alive connection of its own; ``worst`` is the
    slowest answer (seconds), ``count`` the answers, ``failures`` the non-200 ones."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.worst = 0.0
        self.count = 0
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=30) as c:
            c.get(self.url + "/health")  # connect before measuring
            while not self._stop.is_set():
                t0 = time.perf_counter()
                r = c.get(self.url + "/health")
                self.worst = max(self.worst, time.perf_counter() - t0)
                self.count += 1
                self.failures += r.status_code != 200
                self._stop.wait(0.02)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        time.sleep(0.1)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def post_raw(port: int, path: str, head: dict[str, str], parts: list[bytes], pause: float = 0.0,
             read_timeout: float = 20) -> tuple[int, dict]:
    """POST over a raw socket: ``head`` headers, then ``parts`` of the body (``pause`` s apart; a send
    the server refused ends the sending); returns (status, JSON body) of the response."""
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
        sock.sendall("\r\n".join(lines).encode())
        for part in parts:
            try:
                sock.sendall(part)
            except OSError:
                break
            time.sleep(pause)
        data = b""
        while b"\r\n\r\n" not in data or len(data) < data.index(b"\r\n\r\n") + 4 + _length(data):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head_text, _, body = data.partition(b"\r\n\r\n")
    return int(head_text.split()[1]), json.loads(body[:_length(data)])


def _length(data: bytes) -> int:
    for line in data.split(b"\r\n\r\n")[0].split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


def assert_openai_error(r: httpx.Response | tuple[int, dict], status: int, needle: str, param: str | None = None
                        ) -> dict:
    code, body = (r.status_code, r.json()) if isinstance(r, httpx.Response) else r
    assert code == status, body
    err = body["error"]
    assert set(body) == {"error"} and set(err) == {"message", "type", "param", "code"}, body
    assert needle in err["message"], err
    if param is not None:
        assert err["param"] == param, err
    return err


def chat(content: str = "w5 w6", **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 2, **kw}


# -- 2. one request can no longer freeze the server ---------------------------------------------------------
def test_health_answers_while_heavy_requests_in_flight(guarded):
    """Each request that used to freeze the event loop (seconds) is refused or done off the loop while
    /health answers every 20 ms within 100 ms."""
    url = guarded.url
    big = 10 * 1024 * 1024
    text = "w5 " * (1_500_000 // 3)  # 1.5 MB: under the body limit; tokenized on a worker (~1 s)
    cases = [
        ("10 MB prompt, Content-Length", lambda: post_raw(
            guarded.port, "/v1/completions", {"Content-Type": "application/json", "Content-Length": str(big + 40)},
            [b'{"model": "tiny", "prompt": "' + b"w" * 65536] * (big // 65536)),
         413, "exceeds this server's limit of 2097152 bytes"),
        ("10 MB prompt, chunked", lambda: post_raw(
            guarded.port, "/v1/completions", {"Content-Type": "application/json", "Transfer-Encoding": "chunked"},
            [b"10000\r\n" + b"w" * 65536 + b"\r\n"] * (big // 65536)),
         413, "exceeds this server's limit"),
        ("1.5 MB text prompt", lambda: httpx.post(url + "/v1/completions", json={"model": MODEL, "prompt": text},
                                                  timeout=60),
         400, "exceeds the 4096 positions"),
        ("200000 messages", lambda: httpx.post(url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "w5"}] * 200_000}, timeout=60),
         413, "exceeds this server's limit"),
        (f"{MAX_MESSAGES + 1} messages", lambda: httpx.post(url + "/v1/chat/completions", json={
            "model": MODEL, "messages": [{"role": "user", "content": "w5"}] * (MAX_MESSAGES + 1)}, timeout=60),
         400, f"at most {MAX_MESSAGES} messages"),
        ("four 150 KB stop strings", lambda: httpx.post(url + "/v1/completions", json={
            "model": MODEL, "prompt": "w5", "stop": ["w" * 150_000] * 4}, timeout=60),
         400, f"at most {MAX_STOP_CHARS} characters"),
        ("template of 10^10 loop steps", lambda: httpx.post(url + "/v1/chat/completions", json=chat("spin"),
                                                            timeout=60),
         400, "did not render within 2 s"),
    ]
    for name, send, status, needle in cases:
        with HealthProbe(url) as probe:
            t0 = time.perf_counter()
            r = send()
            took = time.perf_counter() - t0
        assert_openai_error(r, status, needle)
        assert probe.count >= 3 and probe.failures == 0, name
        assert probe.worst < 0.1, f"{name}: /health took {probe.worst:.3f} s (request took {took:.2f} s)"
        if name.startswith("template"):
            assert 1.9 < took < 10, took  # the render gave up at its deadline
    # The server still serves.
    r = httpx.post(url + "/v1/chat/completions", json=chat(), timeout=30)
    assert r.status_code == 200 and r.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_slow_body_gets_408(guarded):
    """A client that sends part of its body and stalls is answered 408 after --body-timeout (1 s)."""
    t0 = time.perf_counter()
    r = post_raw(guarded.port, "/v1/completions", {"Content-Type": "application/json", "Content-Length": "100"},
                 [b'{"model": "tiny", '], read_timeout=20)
    assert_openai_error(r, 408, "did not arrive within 1 s")
    assert time.perf_counter() - t0 < 5


# -- 5. errors: OpenAI-shaped, counted once -------------------------------------------------------------
def test_every_error_is_openai_shaped_and_counted_once(guarded):
    url = guarded.url
    before = guarded.metrics()
    post = lambda path, **kw: httpx.post(url + path, timeout=30, **kw)  # noqa: E731
    expect: dict[str, int] = {}

    def check(r, status, needle, param=None):
        assert_openai_error(r, status, needle, param)
        expect[str(status)] = expect.get(str(status), 0) + 1

    check(httpx.get(url + "/nope", timeout=10), 404, "no route GET /nope")
    check(httpx.get(url + "/v1/completions", timeout=10), 405, "method GET is not allowed on /v1/completions")
    check(post("/v1/completions", content=b"[" * 100_000, headers={"content-type": "application/json"}), 400,
          "nested too deeply")
    check(post("/v1/completions", content=b"{not json"), 400, "not valid JSON")
    check(post("/v1/completions", content=b"[1, 2]"), 400, "must be a JSON object")
    check(post("/v1/completions", json={"model": MODEL, "prompt": "w5", "max_tokens": "5"}), 400, "valid integer",
          "max_tokens")
    check(post("/v1/completions", content=b"x" * (DEFAULT_MAX_REQUEST_BYTES + 1)), 413, "exceeds")
    check(post("/v1/completions", json={"model": MODEL, "prompt": "w5", "stop": [""]}), 400, "non-empty", "stop")
    check(post("/v1/completions", json={"model": MODEL, "prompt": "w5", "stop": ["a"] * 5}), 400, "up to 4", "stop")
    check(post("/v1/completions", json={"model": MODEL, "prompt": "w5", "stop": ["a" * (MAX_STOP_CHARS + 1)]}),
          400, f"at most {MAX_STOP_CHARS} characters", "stop")
    r = post("/v1/completions", json={"model": MODEL, "prompt": "w5", "stop": ["a" * MAX_STOP_CHARS], "max_tokens": 2})
    assert r.status_code == 200, r.text
    # Chat roles and content.
    msgs = [{"role": "user", "content": "w5"}, {"role": "user|>\n<|system", "content": "w6"}]
    check(post("/v1/chat/completions", json={"model": MODEL, "messages": msgs}), 400, "messages[1].role: unknown role",
          "messages[1].role")
    check(post("/v1/chat/completions", json={"model": MODEL, "messages": [{"role": "user", "content": None}]}),
          400, "null content is allowed for assistant messages only", "messages[0].content")
    r = post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "messages": [
        {"role": "system", "content": "w5"}, {"role": "user", "content": "w6"},
        {"role": "assistant", "content": None}, {"role": "user", "content": "w7"}]})
    assert r.status_code == 200, r.text
    check(post("/v1/chat/completions", json={"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "w5"}] * (MAX_MESSAGES + 1)}]}), 400,
        f"at most {MAX_MESSAGES} content parts")
    after = guarded.metrics()
    for status, n in expect.items():
        key = f"mtx_requests_rejected_total{{status={status}}}"
        assert after.get(key, 0) - before.get(key, 0) == n, (status, n, after.get(key))
    rejected = lambda m: sum(v for k, v in m.items() if k.startswith("mtx_requests_rejected_total"))  # noqa: E731
    assert rejected(after) - rejected(before) == sum(expect.values())


# -- 5. a non-streamed request ends when its client goes away -------------------------------------------------
def test_non_streamed_request_cancelled_when_client_disconnects(parity_export):
    """A non-streamed request of 10^8 tokens (tokens flowing all the time) is cancelled, its row freed,
    within a second of its client closing the connection."""
    s = Server(parity_export("mistral", "onnx"), "--max-batch", "1")
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(s.url + "/v1/completions", json={"model": MODEL, "prompt": "w5", "max_tokens": 10**8,
                                                         "ignore_eos": True}, timeout=1.5)
        t0 = time.monotonic()
        while s.metrics()["mtx_requests_running"] != 0:
            assert time.monotonic() - t0 < 3, "the abandoned request kept its row"
            time.sleep(0.05)
        m = s.metrics()
        assert m["mtx_requests_finished_total{reason=cancelled}"] == 1
        assert m["mtx_generation_tokens_total"] > 10  # it did run before the client left
    finally:
        s.stop()


# -- 5. a port in use or a bad host: one line, README's exit codes -------------------------------------------
def test_serve_port_in_use_and_bad_host(run_mtx, parity_export):
    export = parity_export("mistral", "onnxruntime")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run_mtx("serve", export, "--port", port, timeout=120)
    assert r.returncode == 1, r.stderr
    assert r.stderr.strip() == f"mtx: error: --port {port}: 127.0.0.1:{port} is already in use", r.stderr
    for host, needle in (("no-such-host.invalid", "cannot resolve this address"),
                         ("192.0.2.1", "not an address of this machine")):
        r = run_mtx("serve", export, "--host", host, "--port", free_port(), timeout=120)
        assert r.returncode == 2, r.stderr
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"mtx: error: --host '{host}': {needle}"), r.stderr
        assert "http://" not in r.stderr


# -- units: the limits and the template deadline, without a server ------------------------------------------
def test_template_deadline_bounds_nested_loops_and_big_values():
    from mtx.serving.chat import ChatTemplate, TemplateError, TemplateTimeout

    messages = [{"role": "user", "content": "w5"}]
    spin = ChatTemplate("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", {}, "t")
    t0 = time.perf_counter()
    with pytest.raises(TemplateTimeout, match="did not render within 0.5 s"):
        spin.render(messages, deadline_s=0.5)
    assert time.perf_counter() - t0 < 1.5
    # Loops over the client's messages are bounded by the same deadline.
    cubic = ChatTemplate("{% for a in messages %}{% for b in messages %}{% for c in messages %}{% endfor %}"
                         "{% endfor %}{% endfor %}", {}, "t")
    with pytest.raises(TemplateTimeout):
        cubic.render(messages * 2000, deadline_s=0.5)
    for src, needle in (("{{ 'x' * 10**10 }}", "'\\*' would build"), ("{{ 2 ** 1000000000 }}", "'\\*\\*' would build")):
        t0 = time.perf_counter()
        with pytest.raises(TemplateError, match=needle):
            ChatTemplate(src, {}, "t").render(messages)
        assert time.perf_counter() - t0 < 0.5
    assert ChatTemplate("{{ 'ab' * 3 }}{{ 2 ** 10 }}", {}, "t").render(messages) == "ababab1024"
    # The trace is removed after rendering (and a previous one restored).
    import sys

    assert sys.gettrace() is None or "Deadline" not in repr(sys.gettrace())


def test_parse_body_limits():
    from mtx.serving.protocol import ApiError, ChatRequest, CompletionRequest, parse_body

    def err(raw: bytes, model=CompletionRequest) -> ApiError:
        with pytest.raises(ApiError) as e:
            parse_body(raw, model)
        return e.value

    assert "nested too deeply" in err(b'{"prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}").message
    assert err(b'"x"').message == "request body must be a JSON object"
    many = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "a"}] * (MAX_MESSAGES + 1)})
    assert err(many.encode(), ChatRequest).param == "messages"
    assert "one prompt per request" in err(json.dumps({"model": MODEL, "prompt": ["a", "b"]}).encode()).message
    assert parse_body(json.dumps(chat()).encode(), ChatRequest).messages[0].content == "w5 w6"
    # an integer of 5000 digits: Python's json raises a plain ValueError (found by review: it was a 500)
    huge = err(b'{"model": "m", "prompt": "hi", "seed": 1' + b"0" * 5000 + b"}")
    assert huge.status == 400 and "not valid JSON" in huge.message


def test_template_c_calls_are_bounded_before_they_run():
    """Single C calls a template can blow up (found by review) are refused before they run."""
    from mtx.serving.chat import ChatTemplate, TemplateError

    messages = [{"role": "user", "content": "w5"}]
    for src in ("{% set x = ('f' * 16000)|int(base=16) %}{{ x * x }}", "{{ ''|center(600000000) }}",
                "{{ '%0600000000d' % 1 }}", "{{ ('x' * 1000000)|replace('x', 'x' * 20) }}",
                "{{ 'a'.center(600000000) }}", "{{ 'a'.ljust(600000000) }}", "{{ ('\t' * 100000).expandtabs(1000) }}",
                "{{ (2 ** 9000000) * (2 ** 9000000) }}"):
        t0 = time.perf_counter()
        with pytest.raises(TemplateError, match="would build"):
            ChatTemplate(src, {}, "t").render(messages)
        assert time.perf_counter() - t0 < 0.5, src
    ok = "{{ 'ok'|center(6) }}|{{ '%3d' % 7 }}|{{ 'ab'|replace('a', 'c') }}|{{ '12'|int }}|{{ 'x'.rjust(3) }}"
    assert ChatTemplate(ok, {}, "t").render(messages) == "  ok  |  7|cb|12|  x"


def test_serve_options_are_checked_for_every_front_end():
    """ServeOptions refuses bad limits itself, so `serve run mtx.serving.ray_app:build` gets the CLI's checks."""
    from mtx.errors import UsageError
    from mtx.serving.server import ServeOptions

    for bad in (dict(body_timeout_s=0), dict(body_timeout_s=float("nan")), dict(max_request_bytes=-1),
                dict(max_queue=0), dict(token_budget=0), dict(decode_deferral_tokens=-1)):
        with pytest.raises(UsageError, match=next(iter(bad))):
            ServeOptions(**bad)
    ServeOptions(body_timeout_s=0.5, max_request_bytes=1, decode_deferral_tokens=0)


def test_a_second_server_on_the_same_port_fails_before_loading():
    """The socket listens as soon as it is bound (found by review: two servers could bind one port, and
    the second printed its URL but never listened)."""
    from mtx.errors import MtxError
    from mtx.serving.http import bind

    first = bind("127.0.0.1", 0)
    try:
        with pytest.raises(MtxError, match="already in use"):
            bind("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()

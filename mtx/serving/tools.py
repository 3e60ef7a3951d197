"""Tool calling and structured output for the OpenAI routes: request fields -> grammar, model output ->
OpenAI ``tool_calls``.

* :func:`response_grammar`: ``response_format`` (``json_object``, ``json_schema``) and vLLM's
  ``guided_json`` / ``guided_regex`` / ``guided_choice`` / ``guided_grammar`` as a :class:`GrammarSpec`
  (at most one of them).
* :func:`tool_request`: ``tools``, ``tool_choice`` (``auto``, ``none``, ``required``, a named function)
  and ``parallel_tool_calls`` checked (400 naming the field: a bad tool, an invalid parameters schema,
  a ``tool_choice`` naming a missing function) into a :class:`ToolRequest`: the tools the prompt gets,
  and for ``required`` / a named function the grammar that forces the call: the ``[TOOL_CALLS]``
  token, then a JSON list of ``{"name": ..., "arguments": ...}`` objects whose arguments follow each
  function's ``parameters`` schema (Mistral's format for tokenizers v2-v7 and their HF conversions).
  ``none`` drops the tools from the prompt and parses no call.
* :class:`ToolOutput` splits a request's tokens at ``[TOOL_CALLS]`` into content and tool calls, and
  streams the calls as OpenAI does (first delta: index, id, type, function name; then argument
  fragments). Call ids are 9 alphanumerics (:func:`new_call_id`): Mistral's format requires them.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass
from typing import Any

from mtx.errors import UsageError
from mtx.runtime.grammar import JSON_OPTIONS, MAX_GRAMMAR_CHARS, GrammarSpec, json_schema_spec, limits

#: The control token that opens Mistral's tool calls.
TOOL_CALLS_TOKEN = "[TOOL_CALLS]"
#: Tools one request may define.
MAX_TOOLS = 128
#: OpenAI's rule for function names.
FUNCTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
_ALNUM = string.ascii_letters + string.digits
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")


def new_call_id() -> str:
    """A tool call id: 9 random alphanumerics (Mistral's chat format refuses any other; vLLM #9019)."""
    return "".join(secrets.choice(_ALNUM) for _ in range(9))


def _bad(field: str, message: str) -> UsageError:
    return UsageError(f"{field}: {message}", params=(field,))


def _check_schema(schema: Any, field: str) -> None:
    """UsageError naming ``field`` unless llguidance compiles ``schema`` (no tokenizer needed)."""
    import llguidance

    spec = json_schema_spec(schema, field)
    if len(spec.text) > MAX_GRAMMAR_CHARS:
        raise _bad(field, f"the schema has more than {MAX_GRAMMAR_CHARS} characters")
    try:
        error = llguidance.LLMatcher.validate_grammar(llguidance.LLMatcher.grammar_from_json_schema(spec.text),
                                                      limits=limits())
    except ValueError as e:
        error = str(e)
    if error and not error.startswith("WARNING"):
        raise _bad(field, f"invalid JSON schema: {error.strip().splitlines()[0][:300]}")


def response_grammar(body: Any) -> GrammarSpec | None:
    """The grammar of ``response_format`` / ``guided_*`` (None: unconstrained); UsageError naming the field."""
    given = [f for f in GUIDED_FIELDS if getattr(body, f, None) is not None]
    fmt = getattr(body, "response_format", None)
    if fmt is not None and fmt.get("type", "text") != "text":
        given.insert(0, "response_format")
    if len(given) > 1:
        raise _bad(given[1], f"give one of response_format and {', '.join(GUIDED_FIELDS)}, not {' and '.join(given)}")
    if not given:
        if fmt is not None and fmt.get("type") != "text":
            raise _bad("response_format", "type must be one of text, json_object, json_schema")
        return None
    field = given[0]
    if field == "response_format":
        kind = fmt.get("type")
        if kind == "json_object":
            return json_schema_spec({"type": "object"}, field)
        if kind != "json_schema":
            raise _bad(field, f"type must be one of text, json_object, json_schema, got {str(kind)[:40]!r}")
        js = fmt.get("json_schema")
        if not isinstance(js, dict) or "name" not in js or not isinstance(js.get("name"), str):
            raise _bad(field, "json_schema must be an object with a name and a schema")
        if not isinstance(js.get("strict", False), (bool, type(None))):
            raise _bad(field, "json_schema.strict must be a boolean")
        schema = js.get("schema", {})
        _check_schema(schema, field)
        return json_schema_spec(schema, field)
    value = getattr(body, field)
    if field == "guided_json":
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise _bad(field, f"not valid JSON ({e})") from None
        _check_schema(value, field)
        return json_schema_spec(value, field)
    if field == "guided_choice":
        if not value or not all(isinstance(c, str) and c for c in value):
            raise _bad(field, "give a list of non-empty strings")
        return GrammarSpec("choice", json.dumps(value), field)
    return GrammarSpec("regex" if field == "guided_regex" else "grammar", value, field)


@dataclass(frozen=True)
class ToolRequest:
    """A request's tools, checked: ``tools`` for the prompt (None: none there), ``choice`` ("auto",
    "none", "required" or "function"), the forced ``function``'s name, ``parallel`` calls allowed,
    and ``grammar`` (the forced call's, or None)."""

    tools: list[dict[str, Any]] | None
    choice: str
    function: str | None
    parallel: bool
    grammar: GrammarSpec | None

    @property
    def parses(self) -> bool:
        """Whether the output is read for tool calls."""
        return self.tools is not None


def _checked_tools(tools: list[Any]) -> list[dict[str, Any]]:
    if len(tools) > MAX_TOOLS:
        raise _bad("tools", f"at most {MAX_TOOLS} tools, got {len(tools)}")
    names: set[str] = set()
    out = []
    for i, tool in enumerate(tools):
        where = f"tools[{i}]"
        if not isinstance(tool, dict) or tool.get("type") != "function" or not isinstance(tool.get("function"), dict):
            raise _bad("tools", f"{where}: expected {{\"type\": \"function\", \"function\": {{...}}}}")
        fn = tool["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not FUNCTION_NAME.fullmatch(name):
            raise _bad("tools", f"{where}.function.name: 1 to 64 letters, digits, _ or -, got {str(name)[:80]!r}")
        if name in names:
            raise _bad("tools", f"{where}.function.name: {name!r} is defined twice")
        names.add(name)
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise _bad("tools", f"{where}.function.description must be a string")
        params = fn.get("parameters")
        if params is not None:
            _check_schema(params, "tools")
        out.append({"type": "function", "function": {k: v for k, v in fn.items() if v is not None}})
    return out


def call_schema(tools: list[dict[str, Any]], parallel: bool) -> dict[str, Any]:
    """The JSON schema of Mistral's tool-call list over ``tools``: ``[{"name": <a tool>, "arguments":
    <its parameters>}, ...]``, one call unless ``parallel``."""
    calls = [{"type": "object", "properties": {"name": {"const": t["function"]["name"]},
                                               "arguments": t["function"].get("parameters") or {"type": "object"}},
              "required": ["name", "arguments"], "additionalProperties": False} for t in tools]
    schema: dict[str, Any] = {"x-guidance": JSON_OPTIONS, "type": "array",
                              "items": calls[0] if len(calls) == 1 else {"anyOf": calls}, "minItems": 1}
    if not parallel:
        schema["maxItems"] = 1
    return schema


def tool_request(body: Any, tool_calls_id: int | None, args_format: bool = False) -> ToolRequest | None:
    """The checked tools of a chat ``body`` (None when it has none); ``tool_calls_id``: the tokenizer's
    ``[TOOL_CALLS]`` id (None: the model cannot call tools); ``args_format``: the tokenizer has
    ``[ARGS]`` (Mistral's v11+ call format, not read here: refused). UsageError naming the field."""
    tools, choice = body.tools, body.tool_choice
    parallel = body.parallel_tool_calls is not False
    if not tools:
        if tools is not None and not isinstance(tools, list):
            raise _bad("tools", "expected a list")
        if choice not in (None, "none", "auto"):
            raise _bad("tool_choice", "a tool choice needs tools")
        return None
    checked = _checked_tools(tools)
    name = None
    if choice is None:
        choice = "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise _bad("tool_choice", 'expected "auto", "none", "required" or {"type": "function", "function": '
                                      '{"name": ...}}')
        if name not in {t["function"]["name"] for t in checked}:
            raise _bad("tool_choice", f"no tool named {name[:80]!r} in tools")
        choice = "function"
    elif choice not in ("auto", "none", "required"):
        raise _bad("tool_choice", f"expected \"auto\", \"none\", \"required\" or a named function, "
                                  f"got {str(choice)[:40]!r}")
    if choice == "none":
        return ToolRequest(None, "none", None, parallel, None)
    if tool_calls_id is None:
        raise _bad("tools", f"this model's tokenizer has no {TOOL_CALLS_TOKEN} token, so it cannot call tools")
    if args_format:
        raise _bad("tools", "this model writes tool calls in Mistral's v11 format ([TOOL_CALLS]name[ARGS]{...}), "
                            "which this server does not read yet")
    grammar = None
    if choice in ("required", "function"):
        forced = [t for t in checked if name is None or t["function"]["name"] == name]
        schema = json.dumps(call_schema(forced, parallel and name is None))
        grammar = GrammarSpec("lark", f'start: <[{tool_calls_id}]> " "? %json {schema}', "tool_choice")
    return ToolRequest(checked, choice, name, parallel, grammar)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages as chat templates take them: a tool call's ``arguments`` as an object (OpenAI sends a
    JSON string; templates write it with ``tojson``), as transformers' and vLLM's do."""
    out = []
    for m in messages:
        calls = m.get("tool_calls")
        if calls:
            fixed = []
            for c in calls:
                fn = dict(c.get("function") or {})
                if isinstance(fn.get("arguments"), str):
                    try:
                        fn["arguments"] = json.loads(fn["arguments"])
                    except json.JSONDecodeError:
                        pass
                fixed.append({**c, "function": fn})
            m = {**m, "tool_calls": fixed}
        out.append(m)
    return out


class ToolCallParser:
    """Incremental reader of Mistral's tool-call text (what follows ``[TOOL_CALLS]``): a JSON list of
    ``{"name": ..., "arguments": {...}}`` objects (or one such object).

    :meth:`push` returns OpenAI's ``tool_calls`` deltas: a call's first delta (index, id, type, name)
    once its name is complete, then its ``arguments`` text as it arrives (the raw JSON of the value).
    Invariant: the fragments of a call concatenate to the ``arguments`` :meth:`calls` reports."""

    def __init__(self, parallel: bool = True) -> None:
        self.parallel = parallel
        self.buf = ""
        self._pos = 0
        self._depth = 0
        self._base: int | None = None  # depth of the call objects' contents
        self._in_str = self._esc = False
        self._str_start = 0
        self._expect = "key"
        self._key: str | None = None
        self._value_key: str | None = None
        self._value_start: int | None = None
        self._calls: list[dict[str, Any]] = []

    def _call(self) -> dict[str, Any] | None:
        return self._calls[-1] if self._calls else None

    def _end_value(self, end: int) -> None:
        call, key, start = self._call(), self._value_key, self._value_start
        if call is not None and start is not None:
            raw = self.buf[start:end].strip()
            if key == "name":
                try:
                    name = json.loads(raw)
                except json.JSONDecodeError:
                    name = None
                call["name"] = name if isinstance(name, str) else None
            elif key == "arguments":
                call["args_end"] = start + len(self.buf[start:end].rstrip())
        self._value_key = self._value_start = None
        self._expect = "comma"

    def push(self, text: str) -> list[dict[str, Any]]:
        """Read ``text``; the new deltas."""
        self.buf += text
        buf = self.buf
        for i in range(self._pos, len(buf)):
            c = buf[i]
            if self._in_str:
                if self._esc:
                    self._esc = False
                elif c == "\\":
                    self._esc = True
                elif c == '"':
                    self._in_str = False
                    if self._depth == self._base:
                        if self._expect == "key":
                            try:
                                self._key = json.loads(buf[self._str_start:i + 1])
                            except json.JSONDecodeError:
                                self._key = None
                            self._expect = "colon"
                        elif self._expect == "value":
                            self._end_value(i + 1)
                continue
            if c.isspace():
                continue
            if self._base is None:  # the first character: a list of calls, or one call
                self._base = 2 if c == "[" else 1
            if self._depth == self._base and self._expect == "value_start":
                self._value_key, self._value_start, self._expect = self._key, i, "value"
                if self._value_key == "arguments" and self._call() is not None:
                    self._call()["args_start"] = i  # type: ignore[index]
            if c == '"':
                self._in_str, self._str_start = True, i
            elif c in "{[":
                if c == "{" and self._depth == self._base - 1:
                    self._calls.append({"name": None, "args_start": None, "args_end": None, "sent": 0,
                                        "id": new_call_id(), "open": False})
                    self._expect = "key"
                self._depth += 1
            elif c in "}]":
                self._depth -= 1
                if self._depth == self._base and self._expect == "value":
                    self._end_value(i + 1)
                elif self._depth == self._base - 1 and self._expect == "value":
                    self._end_value(i)  # a scalar value ended by the object's close
            elif c == ":" and self._depth == self._base and self._expect == "colon":
                self._expect = "value_start"
            elif c == "," and self._depth == self._base:
                if self._expect == "value":
                    self._end_value(i)
                self._expect = "key"
        self._pos = len(buf)
        return self._deltas()

    def _deltas(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for k, call in enumerate(self._calls):
            if k and not self.parallel:
                break
            if call["name"] is None:
                continue
            if not call["open"]:
                call["open"] = True
                out.append({"index": k, "id": call["id"], "type": "function",
                            "function": {"name": call["name"], "arguments": ""}})
            start = call["args_start"]
            if start is None:
                continue
            end = call["args_end"]
            if end is None:
                end = len(self.buf) if self.buf[start] in "{[" else start  # a scalar: only once it ends
            frag = self.buf[start + call["sent"]:end]
            if frag:
                call["sent"] += len(frag)
                out.append({"index": k, "function": {"arguments": frag}})
        return out

    def calls(self) -> list[dict[str, Any]] | None:
        """The complete calls in OpenAI's shape, or None if the text is not a well-formed call list."""
        try:
            value = json.loads(self.buf)
        except json.JSONDecodeError:
            return None
        items = value if isinstance(value, list) else [value]
        if not items or len(items) != len(self._calls) or not all(
                isinstance(x, dict) and isinstance(x.get("name"), str) and "arguments" in x for x in items):
            return None
        out = []
        for k, (item, call) in enumerate(zip(items, self._calls)):
            if k and not self.parallel:
                break
            args = item["arguments"]
            if call["args_start"] is not None and call["args_end"] is not None:
                raw = self.buf[call["args_start"]:call["args_end"]]
            else:
                raw = json.dumps(args, ensure_ascii=False)
            if isinstance(args, str):  # arguments given as a JSON string: OpenAI's value is that string
                raw = args
            out.append({"id": call["id"], "type": "function", "function": {"name": item["name"], "arguments": raw}})
        return out


class ToolOutput:
    """One request's output split at the ``[TOOL_CALLS]`` token into content text and tool calls."""

    def __init__(self, tool_calls_id: int, parallel: bool) -> None:
        self.tool_calls_id = tool_calls_id
        self.content: list[str] = []
        self.parser: ToolCallParser | None = None
        self.parallel = parallel

    def push(self, token: int | None, text: str) -> tuple[str, list[dict[str, Any]]]:
        """(content delta, tool call deltas) of one event. Text released with ``[TOOL_CALLS]`` itself was
        held back before it: content."""
        if self.parser is None:
            if token == self.tool_calls_id:
                self.parser = ToolCallParser(self.parallel)
            self.content.append(text)
            return text, []
        return "", self.parser.push(text) if text else []

    def calls(self) -> list[dict[str, Any]] | None:
        """The parsed calls (None: no call, or text that does not parse as one)."""
        return self.parser.calls() if self.parser is not None else None

    def message(self) -> tuple[str | None, list[dict[str, Any]] | None]:
        """(content, tool_calls) of the whole output: content None when calls parsed and it is empty; the
        call text read as content when it does not parse."""
        content = "".join(self.content)
        calls = self.calls()
        if calls:
            return content or None, calls
        if self.parser is not None:
            content += self.parser.buf
        return content, None

"""Which tokenizer an export carries (``--tokenizer-mode``: Mistral's own file or HF's files with the
chat template), and that the runtime and the server use it: prompt ids checked against mistral_common
(encode, encode_chat_completion) and transformers (apply_chat_template), never against mtx."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("mistral_common")

from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage  # noqa: E402
from mistral_common.protocol.instruct.request import ChatCompletionRequest  # noqa: E402
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer  # noqa: E402

from mtx import synthetic_checkpoints as make_checkpoint  # noqa: E402
from mtx.errors import UsageError  # noqa: E402
from mtx.exporter.core import export  # noqa: E402
from mtx.exporter.options import ExportOptions  # noqa: E402
from mtx.manifest import read_manifest  # noqa: E402
from mtx.tokenizer import MistralTextTokenizer, mistral_tokenizer_file, tokenizer_files, tokenizer_mode  # noqa: E402

DATA = Path(MistralTokenizer._data_path())
TEKKEN = DATA / "tekken_240718.json"
V3 = DATA / "mistral_instruct_tokenizer_240323.model.v3"
V1 = DATA / "tokenizer.model.v1"
INST_TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}[INST] {{ m['content'] }} [/INST]"
                 "{% else %}{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def roles(out: Path) -> dict[str, str]:
    return {f.path: f.role for f in read_manifest(out, verify_hashes=True).files}


def copy_folder(src: Path, dst: Path, drop: tuple[str, ...] = (), **extra: Path | str) -> Path:
    """``src`` copied to ``dst`` less ``drop``, plus ``extra`` files (name -> source file or text)."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(*drop))
    for name, content in extra.items():
        name = name.replace("__", ".")
        if isinstance(content, Path):
            shutil.copy(content, dst / name)
        else:
            (dst / name).write_text(content)
    return dst


# -- which mode, which files (no export needed) ---------------------------------------------------------
def test_tokenizer_mode_of_checkpoint_layouts(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    (hf / "tokenizer.json").write_text("{}")
    shutil.copy(TEKKEN, hf / "tekken.json")
    assert tokenizer_mode(hf) == "hf" and tokenizer_mode(hf, "mistral") == "mistral"  # HF layout: tokenizer.json
    (hf / "tokenizer.json").unlink()
    assert tokenizer_mode(hf) == "mistral"  # Mistral's file is its only tokenizer
    ml = tmp_path / "ml"
    ml.mkdir()
    (ml / "params.json").write_text("{}")
    (ml / "tokenizer.json").write_text("{}")
    shutil.copy(V1, ml / "tokenizer.model")
    assert tokenizer_mode(ml) == "mistral" and mistral_tokenizer_file(ml) == (ml / "tokenizer.model", "tokenizer.model.v1")
    assert tokenizer_mode(ml, "hf") == "hf"
    for name in ("tokenizer.model.v3", "tokenizer.model.v7m1", "tokenizer.model.v11"):
        shutil.copy(V3, ml / name)
    assert mistral_tokenizer_file(ml)[1] == "tokenizer.model.v11"  # the highest version
    assert set(tokenizer_files(ml, "mistral")) == {"tokenizer.model.v11"}
    assert set(tokenizer_files(ml, "hf")) == {"tokenizer.json", "tokenizer.model"}
    for mode, needle in (("mistral", f"tokenizer_mode mistral: {tmp_path / 'none'} has no Mistral tokenizer file"),
                         ("hf", f"tokenizer_mode hf: {tmp_path / 'none'} has no tokenizer.json"),
                         ("sp", "tokenizer_mode: expected one of auto, hf, mistral, got 'sp'")):
        (tmp_path / "none").mkdir(exist_ok=True)
        with pytest.raises(UsageError, match=needle) as e:
            tokenizer_mode(tmp_path / "none", mode)
        assert e.value.params == ("tokenizer_mode",) and "\n" not in str(e.value)
    assert tokenizer_mode(tmp_path / "none") == "hf"  # auto never fails: no tokenizer at all


# -- exports --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tekken_mistral_format(mistral_layout_factory, tmp_path_factory) -> Path:
    """The tiny Mistral in the mistral-inference layout with Nemo's tekken.json and no HF tokenizer."""
    return copy_folder(mistral_layout_factory("mistral"), tmp_path_factory.mktemp("tk") / "ckpt",
                       drop=("tokenizer.json", "tokenizer_config.json"), tekken__json=TEKKEN)


def test_tekken_checkpoint_exports_its_tokenizer(run_mtx, tekken_mistral_format, tmp_path):
    """A mistral-format checkpoint with tekken.json: the export carries it (role tokenizer, hashed), and
    the runtime tokenizes with mistral_common."""
    import mtx.runtime

    r = run_mtx("inspect", tekken_mistral_format, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["tokenizer_mode"] == "mistral", r.stderr

    out = tmp_path / "out"
    result = export(tekken_mistral_format, out, ExportOptions())
    files = roles(out)
    assert files["tekken.json"] == "tokenizer" and "tokenizer.json" not in files
    assert sha256(out / "tekken.json") == sha256(TEKKEN)
    assert any(n.startswith("tokenizer: tekken.json") for n in result.notes)
    ref = MistralTokenizer.from_file(str(TEKKEN)).instruct_tokenizer.tokenizer
    for folder in (out, tekken_mistral_format):  # the export, and the checkpoint itself (torch backend)
        gen = mtx.runtime.load(folder)
        assert isinstance(gen.tokenizer, MistralTextTokenizer)
        assert gen.encode("Hello [INST] world") == ref.encode("Hello [INST] world", bos=True, eos=False)
        ids = ref.encode("Bonjour, ça va ? 😀", bos=False, eos=False)
        assert gen.decode(ids) == ref.decode(ids)


def test_bare_tokenizer_model_is_exported_as_v1(mistral_layout_factory, tmp_path):
    ckpt = copy_folder(mistral_layout_factory("mistral"), tmp_path / "ckpt", drop=("tokenizer.json",),
                       tokenizer__model=V1)
    out = tmp_path / "out"
    export(ckpt, out, ExportOptions(target="onnx"))
    assert {n for n, r in roles(out).items() if r == "tokenizer"} == {"tokenizer.model.v1"}
    assert tokenizer_mode(out) == "mistral" and mistral_tokenizer_file(out)[1] == "tokenizer.model.v1"


def test_hf_checkpoint_in_each_mode(run_mtx, ckpt_factory, tmp_path):
    """An HF checkpoint shipping both kinds (as Mistral's repositories do): auto exports HF's files with
    the chat template; --tokenizer-mode mistral exports Mistral's file (and generation_config.json) only."""
    ckpt = copy_folder(ckpt_factory("mistral"), tmp_path / "ckpt", tekken__json=TEKKEN,
                       chat_template__jinja=INST_TEMPLATE)
    assert (ckpt / "generation_config.json").is_file()
    hf_out, mistral_out = tmp_path / "hf", tmp_path / "mistral"
    export(ckpt, hf_out, ExportOptions(target="onnx"))
    assert {n for n, r in roles(hf_out).items() if r == "tokenizer"} == {
        "tokenizer.json", "tokenizer_config.json", "generation_config.json", "chat_template.jinja"}
    r = run_mtx("export", ckpt, "-o", mistral_out, "--target", "onnx", "--tokenizer-mode", "mistral")
    assert r.returncode == 0, r.stderr
    assert {n for n, r in roles(mistral_out).items() if r == "tokenizer"} == {"tekken.json", "generation_config.json"}
    assert "tokenizer: tekken.json" in r.stdout
    r = run_mtx("export", ckpt_factory("mistral"), "-o", tmp_path / "x", "--tokenizer-mode", "mistral")
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [
        f"mtx: error: --tokenizer-mode mistral: {ckpt_factory('mistral')} has no Mistral tokenizer file "
        f"(tekken.json or tokenizer.model.v<N>)"], r.stderr
    assert not (tmp_path / "x").exists()


def test_a_broken_chat_template_fails_the_export_in_one_line(run_mtx, ckpt_factory, tmp_path):
    ckpt = copy_folder(ckpt_factory("mistral"), tmp_path / "ckpt", chat_template__jinja="{% if %}")
    r = run_mtx("export", ckpt, "-o", tmp_path / "out")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mtx: error: {ckpt / 'chat_template.jinja'}: not a valid "
                                                   f"jinja2 template"), r.stderr
    assert not (tmp_path / "out").exists()


# -- the server's chat prompts ---------------------------------------------------------------------------
def openai_server(out: Path):
    import mtx.runtime
    from mtx.serving.engine import Engine
    from mtx.serving.metrics import ServingMetrics
    from mtx.serving.openai_api import OpenAIServer

    return OpenAIServer(Engine(mtx.runtime.load(out)), "m", out, ServingMetrics())


def chat_ids(server, messages: list[dict]) -> list[int]:
    from mtx.serving.protocol import ChatRequest

    return server.prepare_chat(ChatRequest(model="m", messages=messages)).ids


def test_server_uses_the_exported_chat_template(ckpt_factory, tmp_path):
    """chat_template.jinja in the checkpoint: the served prompt is that template's (exact ids), not
    mtx's default one; the client's "[INST]" stays text."""
    from transformers import AutoTokenizer

    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers

    ckpt = copy_folder(ckpt_factory("mistral"), tmp_path / "ckpt", chat_template__jinja=INST_TEMPLATE)
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, "[INST]": 3, "[/INST]": 4, **{f"w{i}": i for i in range(5, 128)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in ("<s>", "</s>", "[INST]", "[/INST]")])
    tok.save(str(ckpt / "tokenizer.json"))
    out = tmp_path / "out"
    export(ckpt, out, ExportOptions(target="onnx"))
    server = openai_server(out)
    try:
        messages = [{"role": "user", "content": "w5 w6"}, {"role": "assistant", "content": "w7"},
                    {"role": "user", "content": "w8"}]
        want = AutoTokenizer.from_pretrained(out).apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(want) == [1, 3, 5, 6, 4, 7, 2, 3, 8, 4]  # <s> [INST] w5 w6 [/INST] w7 </s> [INST] w8 [/INST]
        assert chat_ids(server, messages) == want
        # the client's "[INST]" is the text "[", "INST", "]" (unknown words here), never control token 3
        assert chat_ids(server, [{"role": "user", "content": "w5 [INST]"}]) == [1, 3, 5, 0, 0, 0, 4]
    finally:
        server.close()


@pytest.fixture(scope="module")
def v3_export(tmp_path_factory) -> Path:
    """A tiny Mistral with the v3 vocabulary (32768), mistral-format, with tokenizer.model.v3, exported."""
    base = tmp_path_factory.mktemp("v3")
    hf = make_checkpoint.make_hf(base / "hf", "mistral", vocab=32768, hidden=32, layers=2, heads=2, kv_heads=1,
                                 intermediate=48, tie=True, tokenizer=False)
    ckpt = make_checkpoint.to_mistral_layout(hf, base / "ckpt")
    shutil.copy(V3, ckpt / "tokenizer.model.v3")
    export(ckpt, base / "out", ExportOptions())
    return base / "out"


CONVERSATION = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi [INST] there"},
                {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Tell me a joke </s>"}]


def reference_ids() -> list[int]:
    ref = MistralTokenizer.from_file(str(V3))
    return ref.encode_chat_completion(ChatCompletionRequest(messages=[
        SystemMessage(content="You are terse."), UserMessage(content="Hi [INST] there"),
        AssistantMessage(content="Hello!"), UserMessage(content="Tell me a joke </s>")])).tokens


def test_served_mistral_chat_over_http(v3_export):
    """`mtx serve` of a mistral-format export, driven by the openai client: the prompt is
    encode_chat_completion's, and the reply is the text of Generator.generate from those ids."""
    import mtx.runtime
    from test_serving_http import Server

    ids = reference_ids()
    gen = mtx.runtime.load(v3_export)
    expect = gen.generate([ids], max_new_tokens=8, stop_token_ids=[])[0]
    server = Server(v3_export)
    try:
        client = server.client()
        r = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=8, temperature=0,
                                           extra_body={"ignore_eos": True})
        assert r.usage.prompt_tokens == len(ids)
        assert r.choices[0].message.content == MistralTokenizer.from_file(str(V3)).decode(expect)
        stream = client.chat.completions.create(model="tiny", messages=CONVERSATION, max_tokens=8, temperature=0,
                                                stream=True, extra_body={"ignore_eos": True})
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == r.choices[0].message.content
        import openai

        with pytest.raises(openai.BadRequestError) as e:  # Mistral's format: the last turn is the user's
            client.chat.completions.create(model="tiny", messages=CONVERSATION[:3], max_tokens=4)
        assert e.value.status_code == 400 and e.value.body["param"] == "messages"
        assert "mistral_common" in e.value.body["message"] and "\n" not in e.value.body["message"]
    finally:
        server.stop()


def test_prepare_chat_in_process(v3_export):
    server = openai_server(v3_export)
    try:
        assert chat_ids(server, CONVERSATION) == reference_ids()
    finally:
        server.close()

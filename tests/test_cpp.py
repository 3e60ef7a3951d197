"""The C++ runtime (cpp/, libmtx_runtime) against the Python runtime (mtx.runtime) and HF tokenizers.

cpp/ is configured and built once per session into build/cpp (Release, -j2; a rebuild is incremental;
the ``cpp_build`` fixture of conftest.py), and its GoogleTest unit tests run through ctest. The driver build/cpp/mtx_cpp_check takes one JSON
request (docs in cpp/tools/cpp_check.cpp) and prints one JSON result; these tests compare its tokens
and logits with the Python runtime's on the same exports.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from broken_exports import BROKEN, make_broken, store_symlinks

ROOT = Path(__file__).resolve().parents[1]
PREFILL_CHUNK = 5  # prompts of 3-5x the window of 8 are fed in several chunks
PROMPT = [5, 17, 99, 3, 42, 8, 11]
N_NEW = 30  # prompt 7 + 30 tokens: more than 3 wraps of the window of 8 (capacity 8)


def _run(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, **kw)


def check(build: Path, tmp_path: Path, request: dict, expect_error: bool = False) -> dict:
    """Run mtx_cpp_check on ``request``; its JSON result (or {"error": ...} with exit status 2)."""
    req = tmp_path / f"req-{os.getpid()}-{len(list(tmp_path.iterdir()))}.json"
    req.write_text(json.dumps(request))
    r = _run([str(build / "mtx_cpp_check"), str(req)], timeout=600)
    assert r.returncode in (0, 2), f"mtx_cpp_check crashed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    out = json.loads(r.stdout)
    if expect_error:
        assert r.returncode == 2 and "error" in out, out
    else:
        assert r.returncode == 0, out
    return out


def py_load(export: Path, **kw):
    import mtx.runtime

    return mtx.runtime.load(export, prefill_chunk=PREFILL_CHUNK, **kw)


CASES = [("mistral", "onnxruntime"), ("mistral", "onnx"), ("mixtral4", "onnxruntime"), ("mixtral4", "onnx"),
         ("mistral_full", "onnxruntime"), ("mistral_full", "onnx")]


#: Quantised exports (docs/ops.md §7; manifest v3 with its quantization entry): MatMulNBits, QMoE and
#: GatherBlockQuantized (the embedding; a tied lm_head over the same codes) for onnxruntime, blocked
#: DequantizeLinear for onnx.
QUANTIZED = [("mistral", "onnxruntime", dict(quantize="int4", block_size=32)),
             ("mixtral4", "onnxruntime", dict(quantize="int4", block_size=32)),
             ("tied", "onnxruntime", dict(quantize="int4")),
             ("mistral", "onnx", dict(quantize="int8", block_size=32))]


@pytest.mark.parametrize("variant,target,options", [(*c, {}) for c in CASES]
                         + [("mistral", "onnxruntime", dict(dtype="float16"))] + QUANTIZED)
def test_greedy_and_score_match_python(cpp_build, parity_export, tmp_path, variant, target, options):
    export = parity_export(variant, target, **options)
    gen = py_load(export)
    want = gen.generate([PROMPT], max_new_tokens=N_NEW, stop_token_ids=[])[0]
    got = check(cpp_build, tmp_path, {"op": "generate", "export": str(export), "prompts": [PROMPT],
                                      "max_new_tokens": N_NEW, "stop": [], "prefill_chunk": PREFILL_CHUNK})
    assert got["tokens"][0] == want
    seq = PROMPT + want  # 37 tokens: chunked prefill through >= 3 wraps of the window
    ref = gen.score(seq)
    out = tmp_path / "logits.bin"
    check(cpp_build, tmp_path, {"op": "score", "export": str(export), "tokens": seq, "out": str(out),
                                "prefill_chunk": PREFILL_CHUNK})
    logits = np.fromfile(out, dtype=np.float32).reshape(ref.shape)
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5)


PROMPTS = [[5, 17, 99, 3, 42, 8, 11], [64, 3, 77], [9] * 13]
SAMPLING = [dict(temperature=0.9, seed=7), dict(temperature=1.3, top_k=12, seed=2**62 + 5),
            dict(temperature=0.7, top_p=0.8, repetition_penalty=1.4, seed=99),
            dict(temperature=1.0, top_k=30, top_p=0.95, repetition_penalty=0.8, seed=0)]


@pytest.mark.parametrize("variant,target", [("mistral", "onnxruntime"), ("mixtral4", "onnx")])
def test_seeded_sampling_matches_python(cpp_build, parity_export, tmp_path, variant, target):
    """Session (stream 0) and batch (row r = stream r, rows decoded together) token for token."""
    export = parity_export(variant, target)
    gen = py_load(export)
    for params in SAMPLING:
        want = [gen.session() for _ in PROMPTS]
        for s, p in zip(want, PROMPTS):
            s.append(p)
        want_tokens = [s.generate(N_NEW, stop_token_ids=[], **params) for s in want]
        got = check(cpp_build, tmp_path, {"op": "generate", "export": str(export), "prompts": PROMPTS,
                                          "max_new_tokens": N_NEW, "stop": [], "sampling": params,
                                          "prefill_chunk": PREFILL_CHUNK})
        assert got["tokens"] == want_tokens, params
        assert len({tuple(t) for t in want_tokens}) > 1  # sampled, not one greedy run
        batch = gen.generate(PROMPTS, max_new_tokens=N_NEW, stop_token_ids=[], **params)
        got = check(cpp_build, tmp_path, {"op": "generate", "mode": "batch", "export": str(export),
                                          "prompts": PROMPTS, "max_new_tokens": N_NEW, "stop": [],
                                          "sampling": params, "prefill_chunk": PREFILL_CHUNK})
        assert got["tokens"] == batch, params


@pytest.mark.parametrize("params", [dict(temperature=1e-310, seed=1), dict(temperature=0.8, repetition_penalty=1e-320,
                                                                           seed=2),
                                    dict(temperature=1e-310, repetition_penalty=1e-320, top_k=5, top_p=0.5, seed=3)])
def test_poisoned_sampling_options_stay_in_the_vocabulary(cpp_build, parity_export, tmp_path, params):
    """A temperature of 1e-310 or a penalty of 1e-320 once gave NaN probabilities and token id == vocab
    size (exit 0). Both runtimes now draw valid ids, the same ones, batch rows together."""
    export = parity_export("mistral", "onnxruntime")
    gen = py_load(export)
    want = gen.generate(PROMPTS, max_new_tokens=N_NEW, stop_token_ids=[], **params)
    assert all(0 <= t < gen.config.vocab_size for row in want for t in row)
    got = check(cpp_build, tmp_path, {"op": "generate", "mode": "batch", "export": str(export), "prompts": PROMPTS,
                                      "max_new_tokens": N_NEW, "stop": [], "sampling": params,
                                      "prefill_chunk": PREFILL_CHUNK})
    assert got["tokens"] == want


def test_turns_and_stop_ids_match_python(cpp_build, parity_export, tmp_path):
    """Multi-turn session (the last generated token pending until the next turn) and stop ids."""
    export = parity_export("mistral", "onnx")
    s = py_load(export).session()
    want = []
    for turn in PROMPTS:
        s.append(turn)
        want.append(s.generate(9, stop_token_ids=[], temperature=0.8, seed=3))
    got = check(cpp_build, tmp_path, {"op": "turns", "export": str(export), "turns": PROMPTS, "max_new_tokens": 9,
                                      "stop": [], "sampling": {"temperature": 0.8, "seed": 3},
                                      "prefill_chunk": PREFILL_CHUNK})
    assert got["tokens"] == want
    stop = want[0][4]  # stop at the first occurrence of this token (included)
    got = check(cpp_build, tmp_path, {"op": "turns", "export": str(export), "turns": PROMPTS[:1], "max_new_tokens": 9,
                                      "stop": [stop], "sampling": {"temperature": 0.8, "seed": 3},
                                      "prefill_chunk": PREFILL_CHUNK})
    assert got["tokens"][0] == want[0][:want[0].index(stop) + 1]


def corpus_lines(n: int = 4000) -> list[str]:
    """Real text: Python standard library source lines and this repository's docs, plus non-ASCII lines."""
    import sysconfig

    lines: list[str] = []
    for path in sorted((ROOT / "docs").glob("*.md")) + [ROOT / "README.md"]:
        lines += path.read_text().splitlines()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for name in ("textwrap.py", "argparse.py", "json/decoder.py", "email/utils.py", "difflib.py", "calendar.py"):
        lines += (stdlib / name).read_text(encoding="utf-8").splitlines()
    lines += ["naïve café — “quotes” ½ ∑ 𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "日本語のテキスト、中文文本。", "emoji 👩‍💻🚀 and tabs\t\tend  ",
              "Ünïcödé  spaces\u00a0nbsp 123,456.78 ١٢٣", "   leading spaces", "trailing\n\n", "<s>special</s> <unk>"]
    return [line for line in lines if line][:n]


@pytest.fixture(scope="module")
def lines_file(tmp_path_factory) -> tuple[Path, list[str]]:
    lines = corpus_lines()
    assert len(lines) >= 3000
    path = tmp_path_factory.mktemp("corpus") / "lines.json"
    path.write_text(json.dumps(lines))
    return path, lines


def _trained_bpe(folder: Path, lines: list[str]) -> Path:
    """A byte-level BPE tokenizer.json trained by HF tokenizers (add_prefix_space on, list-form merges)."""
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer(add_prefix_space=True)
    tok.train_from_iterator(lines, vocab_size=1500, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    path = folder / "tokenizer.json"
    tok.save(str(path))
    return path


def test_bpe_tokenizer_matches_hf_tokenizers(cpp_build, lines_file, tmp_path):
    from tokenizers import Tokenizer

    path, lines = lines_file
    for tj in (ROOT / "mtx" / "assets" / "default-mistral" / "tokenizer.json", _trained_bpe(tmp_path, lines)):
        hf = Tokenizer.from_file(str(tj))
        got = check(cpp_build, tmp_path, {"op": "tokenize", "tokenizer": str(tj), "lines": str(path)})
        want = [hf.encode(line).ids for line in lines]
        bad = [i for i, (g, w) in enumerate(zip(got["ids"], want)) if g != w]
        assert not bad, f"{tj}: {len(bad)} of {len(lines)} lines differ, first {lines[bad[0]]!r}: " \
                        f"{got['ids'][bad[0]]} != {want[bad[0]]}"
        assert got["decoded"] == [hf.decode(w, skip_special_tokens=True) for w in want]


def _trained_sentencepiece(folder: Path, lines: list[str], model_type: str) -> Path:
    """A byte-fallback SentencePiece tokenizer.model trained by the sentencepiece package."""
    import sentencepiece as spm

    prefix = folder / f"sp-{model_type}"
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(prefix), vocab_size=800,
                                   model_type=model_type, byte_fallback=True, minloglevel=2)
    return Path(f"{prefix}.model")


@pytest.mark.parametrize("model_type", ["unigram", "bpe"])
def test_sentencepiece_matches_python_sentencepiece(cpp_build, lines_file, tmp_path, model_type):
    import sentencepiece as spm

    path, lines = lines_file
    model = _trained_sentencepiece(tmp_path, lines, model_type)
    sp = spm.SentencePieceProcessor(model_file=str(model))
    got = check(cpp_build, tmp_path, {"op": "tokenize", "tokenizer": str(model), "lines": str(path)})
    want = [sp.encode(line) for line in lines]
    assert got["decoded"] == [sp.decode(w) for w in want]
    # Debian's libsentencepiece (0.1.97) and the Python package (0.2.x) break exact unigram ties
    # (segmentations of equal total score, e.g. of "=====") differently; any other difference fails.
    differ = [i for i, (g, w) in enumerate(zip(got["ids"], want)) if g != w]
    for i in differ:
        score = lambda ids: sum(sp.GetScore(t) for t in ids)  # noqa: E731
        assert model_type == "unigram" and score(got["ids"][i]) == pytest.approx(score(want[i]), abs=1e-4) \
            and sp.decode(got["ids"][i]) == sp.decode(want[i]), f"line {lines[i]!r}: {got['ids'][i]} != {want[i]}"
    assert len(differ) <= len(lines) // 100


def _random_sequences(vocab: int, awkward: list[int], lines: list[str], encode, n: int = 60) -> list[list[int]]:
    """Seeded id sequences: uniform ids mixed with `awkward` ones (single bytes, special/control ids), and
    real non-ASCII text (multi-byte characters split over byte tokens)."""
    seqs = []
    for seed in range(n):
        rng = np.random.default_rng(seed)
        length = int(rng.integers(1, 64))
        pick_awkward = rng.random(length) < (0.2 + 0.6 * (seed % 3) / 2)
        seqs.append([int(rng.choice(awkward)) if a else int(rng.integers(0, vocab)) for a in pick_awkward])
    seqs += [encode(line) for line in lines[-7:]]  # corpus_lines' non-ASCII lines
    return seqs


def _check_streamed(cpp_build, tmp_path, tokenizer: Path, seqs: list[list[int]], decode) -> None:
    """Every push's text extends a prefix of decode(ids so far); with the flush it is decode(all ids)."""
    got = check(cpp_build, tmp_path, {"op": "detok", "tokenizer": str(tokenizer), "sequences": seqs})
    for seq, deltas, cpp_decoded in zip(seqs, got["deltas"], got["decoded"]):
        assert len(deltas) == len(seq) + 1
        want = decode(seq)
        assert "".join(deltas) == want == cpp_decoded, seq
        streamed = ""
        for k, delta in enumerate(deltas[:-1]):
            streamed += delta
            assert decode(seq[:k + 1]).startswith(streamed), (seq[:k + 1], streamed)


def test_detokenizer_streams_hf_tokenizers_decode(cpp_build, lines_file, tmp_path):
    """The built-in byte-level BPE tokenizer.json: streamed text equals HF tokenizers' decode."""
    from tokenizers import Tokenizer

    tj = ROOT / "mtx" / "assets" / "default-mistral" / "tokenizer.json"
    hf = Tokenizer.from_file(str(tj))
    vocab = hf.get_vocab()
    # Single byte-level symbols of bytes >= 0x80 (parts of characters) and the special tokens.
    awkward = [i for t, i in vocab.items() if len(t) == 1 and ord(t) >= 0xA1] + [0, 1, 2]
    assert len(awkward) > 60
    seqs = _random_sequences(hf.get_vocab_size(), awkward, lines_file[1], lambda s: hf.encode(s).ids)
    assert any("\ufffd" in hf.decode(s) for s in seqs)  # incomplete characters do occur
    _check_streamed(cpp_build, tmp_path, tj, seqs, lambda ids: hf.decode(ids, skip_special_tokens=True))


def test_detokenizer_streams_sentencepiece_decode(cpp_build, lines_file, tmp_path):
    """A byte-fallback SentencePiece BPE tokenizer.model: streamed text equals sentencepiece's decode."""
    import sentencepiece as spm

    model = _trained_sentencepiece(tmp_path, lines_file[1], "bpe")
    sp = spm.SentencePieceProcessor(model_file=str(model))
    n = sp.get_piece_size()
    awkward = [i for i in range(n) if sp.is_byte(i) and int(sp.id_to_piece(i)[3:5], 16) >= 0x80]
    awkward += [i for i in range(n) if sp.is_control(i) or sp.is_unknown(i)]
    awkward += [i for i in range(n) if sp.id_to_piece(i).startswith("\u2581")][:20]  # word starts: leading spaces
    seqs = _random_sequences(n, awkward, lines_file[1], sp.encode)
    assert any("\ufffd" in sp.decode(s) for s in seqs)
    _check_streamed(cpp_build, tmp_path, model, seqs, sp.decode)


def _mistral_data(pattern: str) -> list[Path]:
    """Tokenizer files mistral_common ships (its package's data folder) matching ``pattern``."""
    mistral_common = pytest.importorskip("mistral_common")
    files = sorted((Path(mistral_common.__file__).parent / "data").glob(pattern))
    assert files, pattern
    return files


def _small_tekken(folder: Path, source: Path) -> Path:
    """A Tekken file in the later layout (version v11, a special_tokens list, fillers after it) cut to a
    vocabulary of 3000 ids with 40 special ids, from a shipped file."""
    d = json.loads(source.read_text())
    d["config"].update(version="v11", default_vocab_size=3000, default_num_special_tokens=40)
    d["vocab"] = d["vocab"][:4000]
    d["special_tokens"] = [{"rank": i, "token_str": s, "is_control": True}
                           for i, s in enumerate(["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]"])]
    # (mistral_common's MistralTokenizer wants a full chat set of special tokens: read with Tekkenizer)
    path = folder / "tekken_small.json"
    path.write_text(json.dumps(d))
    return path


def _mistral_raw(path: Path):
    """mistral_common's text tokenizer of ``path``: MistralTokenizer's, or for _small_tekken's file a Tekkenizer."""
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    if path.name == "tekken_small.json":
        return Tekkenizer.from_file(path)
    return MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer


#: Long lines, each one piece of the Tekken pattern or many: tiktoken's own merge is quadratic in a
#: piece's length, so these stay short where mistral_common gives the ids.
AWKWARD_LINES = ["a" * 2000, "!" * 1500 + "?", "é" * 900, "7" * 999, " " * 700 + "x", "日本" * 500,
                 "x\n" * 400 + "\r\n\r\n  ", "Abc" * 600, "ab\u0301" * 300, "\t \u00a0 \u2003x\u3000y", ""]


def test_tekken_matches_mistral_common(cpp_build, lines_file, tmp_path):
    """Every tekken.json mistral_common ships, and a small one in the later layout: the ids of each
    corpus line (no BOS/EOS, control tokens never parsed from text) are mistral_common's, and so is
    the decode of those ids."""
    path, lines = lines_file
    lines = lines + AWKWARD_LINES
    path = tmp_path / "lines.json"
    path.write_text(json.dumps(lines))
    files = _mistral_data("tekken*.json")
    for tekken in files + [_small_tekken(tmp_path, files[0])]:
        tok = _mistral_raw(tekken)
        got = check(cpp_build, tmp_path, {"op": "tokenize", "tokenizer": str(tekken), "lines": str(path)})
        want = [tok.encode(line, bos=False, eos=False) for line in lines]
        bad = [i for i, (g, w) in enumerate(zip(got["ids"], want)) if g != w]
        assert not bad, f"{tekken.name}: {len(bad)} of {len(lines)} lines differ, first {lines[bad[0]]!r}: " \
                        f"{got['ids'][bad[0]]} != {want[bad[0]]}"
        assert got["decoded"] == [tok.decode(w) for w in want], tekken.name
        assert all(t >= tok.num_special_tokens for w in want for t in w)


def test_tekken_encode_is_linear_in_line_length(cpp_build, tmp_path):
    """Lines 8x longer take about 8x the time (a quadratic merge or UTF-8 check would take 64x): text,
    and single pieces (one word, one run of punctuation) of 25,000 and 200,000 characters."""
    tekken = _mistral_data("tekken*.json")[0]
    text = " ".join(corpus_lines())
    kinds = [lambda n: text[:n], lambda n: "a" * n, lambda n: "!" * n, lambda n: "日本" * (n // 2),
             lambda n: " " * n + "x", lambda n: "x\n" * (n // 2)]
    lines = [k(n) for n in (25_000, 200_000) for k in kinds] * 3
    path = tmp_path / "long.json"
    path.write_text(json.dumps(lines))
    got = check(cpp_build, tmp_path, {"op": "tokenize", "tokenizer": str(tekken), "lines": str(path)})
    secs = np.array(got["seconds"]).reshape(3, 2, len(kinds)).min(axis=0)  # best of 3 per line
    short, long = secs.sum(axis=1)
    assert long < 30 * short + 0.05, secs
    assert long < 5, secs


def test_detokenizer_streams_tekken_decode(cpp_build, lines_file, tmp_path):
    """tekken.json: streamed text equals mistral_common's decode (special ids read as nothing, each run
    of ordinary ids lossy UTF-8 on its own)."""
    tekken = _mistral_data("tekken*.json")[0]
    tok = _mistral_raw(tekken)
    s = tok.num_special_tokens
    awkward = list(range(20)) + [s + b for b in range(0x80, 0x100)]  # control ids; bytes of multi-byte characters
    seqs = _random_sequences(tok.n_words, awkward, lines_file[1], lambda t: tok.encode(t, bos=False, eos=False))
    assert any("\ufffd" in tok.decode(q) for q in seqs)
    _check_streamed(cpp_build, tmp_path, tekken, seqs, tok.decode)


def test_mistral_sentencepiece_files_match_mistral_common(cpp_build, lines_file, tmp_path):
    """Mistral's SentencePiece files (tokenizer.model.v<N>[m<M>], read by libsentencepiece): the ids
    and decode of mistral_common on the corpus; a folder holding several reads the highest version, as
    mtx's Python runtime picks it."""
    from mtx.tokenizer import mistral_tokenizer_file

    path, lines = lines_file
    files = _mistral_data("*.model.v*")
    assert len(files) >= 4
    for model in files:
        tok = _mistral_raw(model)
        got = check(cpp_build, tmp_path, {"op": "tokenize", "tokenizer": str(model), "lines": str(path)})
        want = [tok.encode(line, bos=False, eos=False) for line in lines]
        bad = [i for i, (g, w) in enumerate(zip(got["ids"], want)) if g != w]
        assert not bad, f"{model.name}: {len(bad)} lines differ, first {lines[bad[0]]!r}"
        assert got["decoded"] == [tok.decode(w) for w in want], model.name
    folder = tmp_path / "several"
    folder.mkdir()
    for model in files:
        shutil.copy(model, folder / ("tokenizer.model." + model.name.rsplit(".", 1)[1]))
    pick, _ = mistral_tokenizer_file(folder)
    tok = _mistral_raw(pick)
    got = check(cpp_build, tmp_path, {"op": "tokenize", "tokenizer": str(folder), "lines": str(path)})
    assert got["ids"] == [tok.encode(line, bos=False, eos=False) for line in lines]


def c_check(build: Path, export: Path | str, tokens: list[int], n: int = 4, env: dict | None = None) -> tuple[int, str]:
    """mtx_c_check through the C ABI: (exit status, its one output line)."""
    r = _run([str(build / "mtx_c_check"), str(export), str(n), *map(str, tokens)], timeout=300,
             env={**os.environ, **(env or {})})
    assert r.returncode in (0, 2), f"mtx_c_check crashed ({r.returncode}):\n{r.stdout}\n{r.stderr[-2000:]}"
    return r.returncode, r.stdout.strip()


def test_c_abi_greedy_and_bad_input(cpp_build, parity_export, tmp_path):
    export = parity_export("mistral", "onnxruntime")
    want = py_load(export).generate([PROMPT], max_new_tokens=6, stop_token_ids=[])[0]
    assert c_check(cpp_build, export, PROMPT, 6) == (0, "ok " + " ".join(map(str, want)))
    vocab = json.loads((export / "mtx.json").read_text())["config"]["vocab_size"]

    def refused(folder, tokens, code: int, *words: str) -> None:
        rc, line = c_check(cpp_build, folder, tokens)
        assert rc == 2 and line.startswith(f"error {code} "), line
        assert len(line.splitlines()) == 1 and all(w in line for w in words), line

    refused(export, [5, vocab], 1, f"token id {vocab}", "out of range", str(vocab))
    refused(export, [5, -1], 1, "token id -1")
    refused(export, [], 1, "empty")
    refused(tmp_path / "nowhere", PROMPT, 2, "nowhere", "no such folder")

    def tampered(name: str, edit) -> Path:
        folder = tmp_path / name
        shutil.copytree(export, folder)
        edit(folder)
        return folder

    def flip_byte(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))

    def edit_manifest(folder: Path, **changes) -> None:
        m = json.loads((folder / "mtx.json").read_text())
        m.update(changes)
        (folder / "mtx.json").write_text(json.dumps(m))

    weights = [f["path"] for f in json.loads((export / "mtx.json").read_text())["files"]
               if f["role"] in ("weights", "checkpoint-weights")][0]
    # A manifest the reader accepts but the graph contradicts; what the reader refuses is the shared
    # table of tests/test_manifest.py (run against the Python and the C++ reader).
    m = json.loads((export / "mtx.json").read_text())
    cap, layers = m["capacity"], [{**x, "capacity": 2 * m["capacity"]} for x in m["layers"]]
    refused(tampered("capacity", lambda f: edit_manifest(f, capacity=cap * 2, layers=layers)), PROMPT, 2,
            "layers[0].capacity 16")

    # Weights are hashed once per file state, in the record mtx.integrity keeps (shared with Python);
    # a file changed in place afterwards (same size) is hashed again and refused.
    from mtx.integrity import _load_records, _state

    cache = {"MTX_CACHE_DIR": str(tmp_path / "cache")}
    folder = tampered("in-place", lambda f: None)
    assert c_check(cpp_build, folder, PROMPT, 6, env=cache) == (0, "ok " + " ".join(map(str, want)))
    records = _load_records(tmp_path / "cache" / "verified.json")
    key = str((folder / weights).resolve())
    assert records[key]["state"] == _state(folder / weights)
    assert records[key]["sha256"] == [f["sha256"] for f in json.loads((folder / "mtx.json").read_text())["files"]
                                      if f["path"] == weights][0]
    flip_byte(folder / weights)
    rc, line = c_check(cpp_build, folder, PROMPT, env=cache)
    assert rc == 2 and line.startswith("error 2 ") and "sha256 differs" in line and weights in line, line


def test_threads_match_single_threaded(cpp_build, parity_export, tmp_path):
    """8 threads x 24 sessions over one Model give the Python runtime's (and the 1-thread) tokens."""
    export = parity_export("mixtral4", "onnxruntime")
    prompts = [PROMPTS[i % 3][: 3 + i % 5] + [i] for i in range(24)]
    params = dict(temperature=0.9, top_k=20, seed=11)
    gen = py_load(export)
    want = []
    for p in prompts:
        s = gen.session()
        s.append(p)
        want.append(s.generate(12, stop_token_ids=[], **params))
    req = {"op": "threads", "export": str(export), "prompts": prompts, "max_new_tokens": 12, "stop": [],
           "sampling": params, "prefill_chunk": PREFILL_CHUNK, "intra_op_threads": 1}
    assert check(cpp_build, tmp_path, {**req, "threads": 8})["tokens"] == want
    assert check(cpp_build, tmp_path, {**req, "threads": 1})["tokens"] == want


@pytest.mark.parametrize("target", ["onnxruntime", "onnx"])
def test_kv_bytes_fixed_over_20_windows(cpp_build, parity_export, tmp_path, target):
    export = parity_export("mistral", target, max_position=512) if target == "onnxruntime" else \
        parity_export("mistral", target)
    m = json.loads((export / "mtx.json").read_text())
    cfg = m["config"]
    sets = 1 if m["kv"]["past_present"] == "shared" and not m["attention_op"].startswith("mtx::") else 2
    expect = sets * 2 * cfg["num_layers"] * cfg["num_kv_heads"] * m["capacity"] * cfg["head_dim"] * 4
    got = check(cpp_build, tmp_path, {"op": "kv", "export": str(export), "prompt": PROMPT, "windows": 20,
                                      "prefill_chunk": PREFILL_CHUNK})
    assert got["kv_bytes"] == [expect] * 21
    assert got["position"] == len(PROMPT) + 20 * m["window"] - 1  # the last token stays pending
    s = py_load(export).session()
    s.append(PROMPT)
    assert got["tokens"][len(PROMPT):] == s.generate(20 * m["window"], stop_token_ids=[])


def test_ctest_unit_tests(cpp_build):
    r = _run(["ctest", "--test-dir", str(cpp_build), "--output-on-failure"], timeout=300)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert "100% tests passed" in r.stdout


DOWNSTREAM = """
cmake_minimum_required(VERSION 3.22)
project(downstream CXX)
set(CMAKE_CXX_STANDARD 17)
find_package(mtx 0.1 CONFIG REQUIRED)
add_executable(downstream main.cpp)
target_link_libraries(downstream PRIVATE mtx::runtime)
"""


def readme_example() -> str:
    """The C++ quick-start program of README.md (the downstream project compiles and runs it)."""
    text = (ROOT / "README.md").read_text()
    start = text.index("```cpp\n", text.index("## C++ runtime")) + len("```cpp\n")
    return text[start:text.index("```", start)]


def test_downstream_cmake_project_links_installed_package(cpp_build, builtin_export, tmp_path):
    """find_package(mtx CONFIG) on the installed package; README's example gives mtx.runtime's text."""
    prefix = tmp_path / "prefix"
    r = _run(["cmake", "--install", str(cpp_build), "--prefix", str(prefix)])
    assert r.returncode == 0, r.stderr
    assert (prefix / "lib" / "cmake" / "mtx" / "mtxConfig.cmake").is_file()
    src = tmp_path / "downstream"
    src.mkdir()
    (src / "CMakeLists.txt").write_text(DOWNSTREAM)
    (src / "main.cpp").write_text(readme_example())
    for step in (["cmake", "-S", str(src), "-B", str(src / "build"), f"-DCMAKE_PREFIX_PATH={prefix}",
                  "-DCMAKE_BUILD_TYPE=Release"], ["cmake", "--build", str(src / "build")]):
        r = _run(step)
        assert r.returncode == 0, f"{' '.join(step)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    r = _run([str(src / "build" / "downstream"), str(builtin_export)],
             env={k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"})
    assert r.returncode == 0, r.stderr
    gen = py_load(builtin_export)
    want = gen.generate(["def fibonacci(n):"], max_new_tokens=64, temperature=0.7, top_p=0.9, seed=1234)[0]
    assert r.stdout == gen.decode(want)
    r = _run([str(src / "build" / "downstream"), str(tmp_path / "missing")])
    assert r.returncode == 2 and "no such folder" in r.stderr


@pytest.fixture(scope="module")
def builtin_export(parity_export):
    """The built-in byte-level BPE Mistral (mtx/assets/default-mistral) exported in float32."""
    return parity_export("default-mistral", "onnxruntime", checkpoint=ROOT / "mtx" / "assets" / "default-mistral")


def test_generate_example_matches_python(cpp_build, builtin_export, tmp_path):
    text = "def fibonacci(n):\n    "
    gen = py_load(builtin_export)
    want = gen.generate([text], max_new_tokens=24)[0]
    exe = str(cpp_build / "mtx-generate-cpp")
    r = _run([exe, str(builtin_export), "--prompt", text, "--max-new-tokens", "24", "--ids-out"])
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == [str(t) for t in want]
    r = _run([exe, str(builtin_export), "--prompt", text, "--max-new-tokens", "24"])
    assert r.returncode == 0, r.stderr
    assert r.stdout == gen.decode(want) + "\n"
    for spin in ("--spin", "--no-spin"):  # ONNX Runtime's intra-op spin-wait: a scheduling choice, same tokens
        r = _run([exe, str(builtin_export), "--prompt", text, "--max-new-tokens", "24", "--ids-out", spin,
                  "--threads", "2"])
        assert r.returncode == 0 and r.stdout.split() == [str(t) for t in want], (spin, r.stderr)
    for args, words in ((["--prompt", text, "--top-p", "x"], "--top-p: expected a number"),
                        (["--ids", "1 99999"], "token id 99999 is out of range"),
                        (["--ids", ""], "empty"), (["--prompt", text, "--bogus"], "unknown option --bogus")):
        r = _run([exe, str(builtin_export), *args])
        assert r.returncode == 2 and r.stdout == "", (args, r.stdout, r.stderr)
        assert r.stderr.startswith("mtx-generate-cpp: error: ") and words in r.stderr and \
            len(r.stderr.strip().splitlines()) == 1, r.stderr
    r = _run([exe, str(tmp_path / "missing"), "--prompt", "x"])
    assert r.returncode == 2 and "no such folder" in r.stderr


def test_generate_example_stop_strings(cpp_build, builtin_export):
    """--stop: the text ends before the first stop string, generation ends at the token completing it."""
    text = "def fibonacci(n):\n    "
    gen = py_load(builtin_export)
    want = gen.generate([text], max_new_tokens=40, stop_token_ids=[])[0]
    full = gen.decode(want)
    exe = str(cpp_build / "mtx-generate-cpp")
    base = [exe, str(builtin_export), "--prompt", text, "--max-new-tokens", "40"]
    stops = [full[len(full) // 2:len(full) // 2 + 4], full[len(full) // 3:len(full) // 3 + 2], full[-3:]]
    assert all(stops)
    for stop in stops:
        cut = full.index(stop)
        # The token completing the stop string: the first prefix of the ids whose text contains it.
        k = next(k for k in range(1, len(want) + 1) if stop in gen.decode(want[:k]))
        for extra in ([], ["--stop", "\x01never"]):
            r = _run([*base, "--stop", stop, *extra])
            assert r.returncode == 0, r.stderr
            assert r.stdout == full[:cut] + "\n", (stop, r.stdout)
        r = _run([*base, "--stop", stop, "--ids-out"])
        assert r.returncode == 0 and r.stdout.split() == [str(t) for t in want[:k]], (stop, r.stdout)
    # Of two stop strings the one that occurs first in the text cuts it.
    a, b = stops[0], stops[1]
    r = _run([*base, "--stop", a, "--stop", b])
    assert r.stdout == full[:min(full.index(a), full.index(b))] + "\n"


@pytest.mark.parametrize("args,option,expected", [
    (["--seed", "abc"], "--seed", "an integer in [0, 2**63)"),
    (["--seed", "9223372036854775808"], "--seed", "an integer in [0, 2**63)"),
    (["--threads", "-5"], "--threads", "an integer in [0, 4096]"),
    (["--max-new-tokens", "2.7"], "--max-new-tokens", "an integer >= 0"),
    (["--max-new-tokens", "-1"], "--max-new-tokens", "an integer >= 0"),
    (["--top-k", "3x"], "--top-k", "an integer >= 0"),
    (["--ids", "1 4294967297"], "--ids", "token ids separated by spaces, each an integer in [0, 2**31)"),
    (["--ids", "1 -2"], "--ids", "token ids separated by spaces, each an integer in [0, 2**31)"),
    (["--ids", "1 2.0"], "--ids", "token ids separated by spaces, each an integer in [0, 2**31)"),
])
def test_generate_example_refuses_bad_integers(cpp_build, builtin_export, args, option, expected):
    """Integers are parsed whole and range-checked: one stderr line naming the option, exit status 2."""
    if args[0] != "--ids":
        args = ["--prompt", "x", *args]
    r = _run([str(cpp_build / "mtx-generate-cpp"), str(builtin_export), "--max-new-tokens", "2", *args])
    assert r.returncode == 2 and r.stdout == "", (args, r.returncode, r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"mtx-generate-cpp: error: {option}: expected {expected}, got "), \
        r.stderr


def test_http_example(cpp_build, builtin_export):
    import socket
    import time
    import urllib.error
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([str(cpp_build / "mtx-http-example"), str(builtin_export), "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def post(body: dict) -> tuple[int, dict]:
            req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", json.dumps(body).encode(),
                                         {"Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=60) as resp:
                    return resp.status, json.loads(resp.read())
            except urllib.error.HTTPError as e:
                return e.code, json.loads(e.read())

        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        gen = py_load(builtin_export)
        want = gen.generate(["The rolling buffer"], max_new_tokens=12, temperature=0.8, seed=5)[0]
        status, body = post({"prompt": "The rolling buffer", "max_new_tokens": 12, "temperature": 0.8, "seed": 5})
        assert status == 200 and body == {"ids": want, "text": gen.decode(want)}
        # "stream": the text as it is generated (the Detokenizer), the same text in the end.
        req = urllib.request.Request(f"http://127.0.0.1:{port}/generate", json.dumps(
            {"prompt": "The rolling buffer", "max_new_tokens": 12, "temperature": 0.8, "seed": 5, "stream": True}
        ).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as resp:
            assert resp.status == 200 and resp.headers["Content-Type"].startswith("text/plain")
            assert resp.read().decode() == gen.decode(want)
        status, body = post({"prompt": "x", "top_p": 0, "stream": True})
        assert status == 400 and "top_p" in body["error"]
        status, body = post({"ids": [1, 10**6], "max_new_tokens": 2})
        assert status == 400 and "out of range" in body["error"]
        status, body = post({"prompt": "x", "top_p": 0})
        assert status == 400 and "top_p" in body["error"]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


# --------------------------------------------------------------------------------------------------
# Broken exports (tests/broken_exports.py, the cases tests/test_reliability.py runs against Python):
# one line, exit status 2, nothing on stdout, never a crash or another model's tokens.


@pytest.mark.parametrize("case", list(BROKEN))
def test_generate_example_refuses_broken_exports(cpp_build, parity_export, tmp_path, case):
    needle = make_broken(case, parity_export("mistral", "onnxruntime"), tmp_path / "broken",
                         parity_export("mistral", "onnx"))
    exe = str(cpp_build / "mtx-generate-cpp")
    for verify in ([], ["--no-verify"]):
        r = _run([exe, str(tmp_path / "broken"), "--ids", "1 2 3", "--max-new-tokens", "2", "--ids-out", *verify],
                 timeout=300)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and r.stdout == "", (case, r.returncode, r.stdout, r.stderr[-2000:])
        assert len(lines) == 1 and lines[0].startswith("mtx-generate-cpp: error: ") and needle in lines[0], r.stderr
        assert str(tmp_path / "broken") in lines[0]


def test_generate_example_loads_symlinked_weights_in_a_store(cpp_build, parity_export, tmp_path):
    """Weight files symlinked out of the folder (a deduplicated store) load, verified by their sha256,
    and give the tokens of the untouched export."""
    good = parity_export("mistral", "onnxruntime")
    store_symlinks(good, tmp_path / "linked", tmp_path / "store")
    exe = str(cpp_build / "mtx-generate-cpp")
    args = ["--ids", " ".join(map(str, PROMPT)), "--max-new-tokens", "8", "--ids-out"]
    want = _run([exe, str(good), *args], timeout=300)
    got = _run([exe, str(tmp_path / "linked"), *args], timeout=300)
    assert want.returncode == 0 and got.returncode == 0, got.stderr
    assert got.stdout == want.stdout and len(got.stdout.split()) == 8
    blob = (tmp_path / "linked" / "model.onnx.data").resolve()
    raw = bytearray(blob.read_bytes())
    raw[-16:] = bytes(16)
    blob.write_bytes(bytes(raw))
    r = _run([exe, str(tmp_path / "linked"), *args], timeout=300)
    assert r.returncode == 2 and "model.onnx.data: sha256 differs" in r.stderr, r.stderr


def test_generate_example_out_of_memory_is_one_line(cpp_build, parity_export):
    """Out of memory (an address-space limit) is the machine's failure: one line naming the folder, exit
    status 1, never a crash. Where a limit is first hit varies from run to run (allocations of ONNX
    Runtime's arena and thread stacks), so several limits are tried: each run either completes or fails
    that way, and at least one is out of memory. (``--ids-out``: no text, so the synthetic checkpoint's
    word-level tokenizer, which the C++ tokenizer does not read, is not loaded.)"""
    import resource

    good = parity_export("mistral", "onnxruntime")
    outcomes = []
    for mb in (150, 200, 250, 300, 350):
        limit = lambda mb=mb: resource.setrlimit(resource.RLIMIT_AS, (mb << 20, mb << 20))  # noqa: E731
        r = subprocess.run([str(cpp_build / "mtx-generate-cpp"), str(good), "--ids", "1 2 3", "--max-new-tokens", "2",
                            "--ids-out"], capture_output=True, text=True, timeout=300, preexec_fn=limit)
        lines = r.stderr.strip().splitlines()
        if r.returncode == 0:
            assert len(r.stdout.split()) == 2 and not lines, (mb, r.stdout, r.stderr[-2000:])
            continue
        assert r.returncode == 1 and len(lines) == 1, (mb, r.returncode, r.stderr[-2000:])
        assert lines[0].startswith(f"mtx-generate-cpp: error: {good}") and \
            ("out of memory" in lines[0] or "the system refused a resource" in lines[0]), (mb, lines[0])
        outcomes.append(lines[0])
    assert any("out of memory" in line for line in outcomes), outcomes


# --------------------------------------------------------------------------------------------------
# Prompt-lookup speculative decoding and prefix state files (docs/ops.md §1 rules 7, 10-12, §6).

#: (target, capacity) on window 8: ort_window and ring layouts, with C = W (rollback copies) and
#: C = W + 4 (ring rollback free for k <= 4; ort_window crossing C).
SPEC_EXPORTS = [("onnxruntime", 8), ("onnxruntime", 12), ("onnx", 8), ("onnx", 12)]
SPEC_NEW = 48  # > 3 wraps of capacities 8 and 12


def _spec_export(parity_export, target: str, capacity: int) -> Path:
    return parity_export("mistral", target, cache_capacity=capacity)


def _spec_prompts() -> list[list[int]]:
    """Prompts that repeat themselves (drafts accepted) and seeded random ones (drafts rejected)."""
    rng = np.random.default_rng(21)
    return [[5, 17, 99, 3, 42, 8, 11] * 3 + [5, 17], [9, 4] * 6 + [9], [int(t) for t in rng.integers(0, 120, 13)],
            [int(t) for t in rng.integers(0, 120, 4)]]


@pytest.mark.parametrize("target,capacity", SPEC_EXPORTS)
@pytest.mark.parametrize("params", [dict(), dict(temperature=0.3, top_k=8, seed=3)], ids=["greedy", "seeded"])
def test_speculative_ngram_gives_plain_decoding_tokens(cpp_build, parity_export, tmp_path, target, capacity, params):
    """k = 1..4 drafts a verification: the tokens of C++ plain decoding and of the Python runtime, over
    > 3 wraps of the buffer, with drafts accepted and rejected (rollbacks across wrap boundaries)."""
    export = _spec_export(parity_export, target, capacity)
    prompts = _spec_prompts()
    gen = py_load(export)
    want = [gen.generate([p], max_new_tokens=SPEC_NEW, stop_token_ids=[], **params)[0] for p in prompts]
    if params:  # sampled, not greedy
        assert want != [gen.generate([p], max_new_tokens=SPEC_NEW, stop_token_ids=[])[0] for p in prompts]
    req = {"op": "generate", "export": str(export), "prompts": prompts, "max_new_tokens": SPEC_NEW, "stop": [],
           "sampling": params, "prefill_chunk": PREFILL_CHUNK}
    plain = check(cpp_build, tmp_path, req)
    assert plain["tokens"] == want
    assert all(s == {"verifications": 0, "drafted": 0, "accepted": 0} for s in plain["stats"])
    drafted = accepted = 0
    for k in (1, 2, 3, 4):
        got = check(cpp_build, tmp_path, {**req, "speculative": {"num_tokens": k}})
        assert got["tokens"] == want, k
        for s in got["stats"]:
            assert 0 <= s["accepted"] <= s["drafted"] <= k * s["verifications"]
        drafted += sum(s["drafted"] for s in got["stats"])
        accepted += sum(s["accepted"] for s in got["stats"])
    assert accepted > 0 and drafted > accepted, (drafted, accepted)  # drafts both accepted and rejected


def _layout_row(layout: str, q: int, p: int, capacity: int, window: int) -> int:
    """Where a row at position p holds position q (docs/ops.md §1 rule 10), written here from the spec
    and the measurement (test_ort_window_layout_as_measured), independently of the runtimes' code."""
    if layout == "ring":
        return q % capacity
    if p <= capacity:
        return q
    return q - (p - window - (p - capacity - 1) % (capacity - window + 1))


def _python_prefix_state(export: Path, tokens: list[int], chunk: int):
    """The state of ``tokens`` computed by the Python runtime's ONNX Runtime backend in canonical chunks
    of ``chunk`` (each call ends at a multiple of it), read out of the row's buffers at the places the
    layout puts the live positions."""
    from mtx.manifest import read_manifest
    from mtx.runtime.prefix_state import PrefixState

    m = read_manifest(export)
    b = py_load(export).backend
    st = b.new_state(1)
    p = 0
    while p < len(tokens):
        n = min(len(tokens) - p, chunk - p % chunk)
        b.run(st, slice(0, 1), np.asarray([tokens[p:p + n]], dtype=np.int64), np.asarray([p], dtype=np.int64),
              last_only=True)
        p += n
    window = m.window or m.capacity
    first = max(0, p - window)
    rows = [_layout_row(m.kv.layout, q, p, m.capacity, window) for q in range(first, p)]
    bufs = st.sets[int(st.current[0])]
    layers = m.model_config.num_layers
    keys = np.stack([bufs[2 * l][0][:, rows, :] for l in range(layers)])
    values = np.stack([bufs[2 * l + 1][0][:, rows, :] for l in range(layers)])
    return PrefixState(tuple(tokens), first, keys, values), m


def test_ort_window_layout_as_measured(parity_export):
    """ONNX Runtime's windowed cache (layout ort_window, window 8, capacity 12) holds position q of a row
    at p in row q while p <= C, else in row q - base(p), base(p) = p - W - ((p - C - 1) mod (C - W + 1)),
    whatever calls brought the row to p: the layout the C++ seeding and rollback write. Positions are
    recognised by their layer-0 keys, which depend on the token and position only, taken from the `onnx`
    export's ring buffer (slot q mod C, rule 1)."""
    ort, ring = (_spec_export(parity_export, t, 12) for t in ("onnxruntime", "onnx"))
    tokens = [int(t) for t in np.random.default_rng(5).integers(0, 120, 40)]
    rb = py_load(ring).backend
    st = rb.new_state(1)
    ref = []
    for q, t in enumerate(tokens):
        rb.run(st, slice(0, 1), np.asarray([[t]]), np.asarray([q]), last_only=True)
        ref.append(st.sets[int(st.current[0])][0][0, :, q % 12].copy())  # layer 0 keys [Hkv, D]
    ob = py_load(ort).backend
    for calls in ([1] * 40, [5] * 8, [12, 1, 3, 7, 2, 9, 6], [13, 4, 4, 4, 15], [40]):
        st = ob.new_state(1)
        p = 0
        for n in calls:
            ob.run(st, slice(0, 1), np.asarray([tokens[p:p + n]]), np.asarray([p]), last_only=True)
            p += n
            buf = st.sets[0][0][0]  # layer 0 keys [Hkv, C, D]
            for q in range(max(0, p - 8), p):
                np.testing.assert_allclose(buf[:, _layout_row("ort_window", q, p, 12, 8)], ref[q], atol=1e-4,
                                           err_msg=f"calls {calls}: position {q} at {p}")


PREFIX_CHUNK = 2  # the prefix lengths below are block boundaries: seeded rows continue bit for bit


@pytest.mark.parametrize("target,capacity", SPEC_EXPORTS)
def test_prefix_state_from_python_seeds_a_cpp_session(cpp_build, parity_export, tmp_path, target, capacity):
    """A state written by Python (save_prefix_state) seeds a C++ session that, fed the rest of the prompt,
    generates the tokens of the C++ session that fed the whole prompt from position 0 (and of Python),
    for prefixes below W, equal to W, between W and C, and above C; a C++-written state is the same
    state (Python reads it: same tokens, same bits)."""
    from mtx.runtime.prefix_state import load_prefix_state, save_prefix_state

    export = _spec_export(parity_export, target, capacity)
    prompt = [int(t) for t in np.random.default_rng(capacity).integers(0, 120, 26)]
    base = {"op": "prefix", "export": str(export), "max_new_tokens": 20, "stop": [], "prefill_chunk": PREFIX_CHUNK}
    scratch = check(cpp_build, tmp_path, {**base, "append": [prompt]})["tokens"]
    assert scratch == py_load(export).generate([prompt], max_new_tokens=20, stop_token_ids=[])[0]
    for n in (6, 8, 10, 14, 20):
        state, manifest = _python_prefix_state(export, prompt[:n], PREFIX_CHUNK)
        path = tmp_path / f"prefix-{n}.safetensors"
        save_prefix_state(path, state, manifest)
        got = check(cpp_build, tmp_path, {**base, "state": str(path), "append": [prompt[n:]]})
        assert got["seeded_position"] == n and got["seeded_tokens"] == prompt[:n]
        assert got["tokens"] == scratch, n
        spec = check(cpp_build, tmp_path, {**base, "state": str(path), "append": [prompt[n:]],
                                           "speculative": {"num_tokens": 3}})
        assert spec["tokens"] == scratch, n
        # The same state written by C++ after feeding the prefix: Python reads the same tokens and bits.
        cpp_path = tmp_path / f"cpp-{n}.safetensors"
        check(cpp_build, tmp_path, {**base, "append": [prompt[:n]], "save": str(cpp_path), "max_new_tokens": 0})
        loaded = load_prefix_state(cpp_path, manifest)
        assert loaded.tokens == state.tokens and loaded.first == state.first == max(0, n - 8)
        assert np.array_equal(loaded.keys, state.keys) and np.array_equal(loaded.values, state.values)
        assert loaded.keys.dtype == np.float32 and loaded.keys.shape[2] == n - state.first
    # Off a block boundary the seeded row continues as the row that fed the prefix, then the rest.
    n = 11
    state, manifest = _python_prefix_state(export, prompt[:n], PREFIX_CHUNK)
    save_prefix_state(tmp_path / "odd.safetensors", state, manifest)
    got = check(cpp_build, tmp_path, {**base, "state": str(tmp_path / "odd.safetensors"), "append": [prompt[n:]]})
    assert got["tokens"] == check(cpp_build, tmp_path, {**base, "append": [prompt[:n], prompt[n:]]})["tokens"]
    # Seeded, nothing appended: no logits of the last token to sample from.
    err = check(cpp_build, tmp_path, {**base, "state": str(tmp_path / "odd.safetensors")}, expect_error=True)
    assert err["error"]["code"] == 1 and "append at least one token" in err["error"]["message"]


def _bad_prefix_files(good: Path, other: Path, folder: Path) -> dict[str, tuple[Path, str]]:
    """name -> (a broken copy of the prefix state file ``good``, the field its error must name). ``other``
    is a valid state of another export."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    with safe_open(str(good), framework="numpy") as f:
        md = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    raw = good.read_bytes()
    folder.mkdir()
    cases: dict[str, tuple[Path, str]] = {}

    def add(name: str, field: str, data: bytes | None = None, meta: dict | None = None,
            ts: dict | None = None) -> None:
        path = folder / f"{name}.safetensors"
        if data is not None:
            path.write_bytes(data)
        else:
            save_file(ts if ts is not None else tensors, str(path), metadata=meta if meta is not None else md)
        cases[name] = (path, field)

    add("truncated", "header", raw[:-7])
    add("truncated-header", "header", raw[:20])
    add("short", "header", raw[:5])
    add("header-not-json", "header", (16).to_bytes(8, "little") + b"{not json}      ")
    add("header-too-long", "header", (10 ** 6).to_bytes(8, "little") + raw[8:])
    cases["other-export"] = (other, "export_sha256")
    cases["missing"] = (folder / "nowhere.safetensors", "file")
    for key, value in (("format", "pt"), ("version", "2"), ("dtype", "float16"), ("capacity", "9"),
                       ("window", "0"), ("position", "abc"), ("position", "99999"), ("first", "0"),
                       ("tokens", "[1, 2"), ("tokens", json.dumps(json.loads(md["tokens"])[:-1])),
                       ("tokens", json.dumps(json.loads(md["tokens"])[:-1] + [10 ** 6])),
                       ("tokens", json.dumps(json.loads(md["tokens"])[:-1] + [True]))):
        add(f"{key}-{len(cases)}", key, meta={**md, key: value})
    add("no-metadata", "format", meta={})
    add("extra-metadata", "header", meta={**md, "note": "x"})
    add("missing-tensor", "value.1", ts={k: v for k, v in tensors.items() if k != "value.1"})
    add("extra-tensor", "key.9", ts={**tensors, "key.9": tensors["key.0"]})
    add("wrong-shape", "key.0", ts={**tensors, "key.0": np.concatenate([tensors["key.0"]] * 2, axis=1)})
    add("wrong-dtype", "value.0", ts={**tensors, "value.0": tensors["value.0"].astype(np.float16)})
    return cases


def test_bad_prefix_state_files_refused_by_both_readers(cpp_build, parity_export, tmp_path):
    """Truncated files, another export's state, wrong shapes or dtypes, bad metadata: one line naming the
    file and the field, from the Python reader, the C++ library (InvalidArgument) and mtx-generate-cpp
    (exit status 2, nothing on stdout), never a crash."""
    from mtx.runtime.prefix_state import PrefixStateError, load_prefix_state, save_prefix_state

    export, other_export = _spec_export(parity_export, "onnxruntime", 8), _spec_export(parity_export, "onnx", 8)
    prompt = [int(t) for t in np.random.default_rng(3).integers(0, 120, 12)]
    state, manifest = _python_prefix_state(export, prompt[:10], PREFIX_CHUNK)
    save_prefix_state(tmp_path / "good.safetensors", state, manifest)
    other, other_manifest = _python_prefix_state(other_export, prompt[:10], PREFIX_CHUNK)
    save_prefix_state(tmp_path / "other.safetensors", other, other_manifest)
    assert load_prefix_state(tmp_path / "other.safetensors", other_manifest).tokens == tuple(prompt[:10])
    good = check(cpp_build, tmp_path, {"op": "prefix", "export": str(export),
                                       "state": str(tmp_path / "good.safetensors"), "append": [prompt[10:]],
                                       "max_new_tokens": 2, "stop": []})
    assert good["seeded_position"] == 10
    exe = str(cpp_build / "mtx-generate-cpp")
    cases = _bad_prefix_files(tmp_path / "good.safetensors", tmp_path / "other.safetensors", tmp_path / "bad")
    for name, (path, field) in cases.items():
        head = f"{path}: {field}: "
        with pytest.raises(PrefixStateError) as e:
            load_prefix_state(path, manifest)
        assert str(e.value).startswith(head) and "\n" not in str(e.value), (name, str(e.value))
        err = check(cpp_build, tmp_path, {"op": "prefix", "export": str(export), "state": str(path),
                                          "append": [prompt[10:]], "max_new_tokens": 2}, expect_error=True)["error"]
        assert err["code"] == 1 and err["message"].startswith(head) and "\n" not in err["message"], (name, err)
        r = _run([exe, str(export), "--ids", " ".join(map(str, prompt)), "--max-new-tokens", "2", "--ids-out",
                  "--prefix-state", str(path)], timeout=300)
        assert r.returncode == 2 and r.stdout == "", (name, r.returncode, r.stdout, r.stderr[-2000:])
        assert r.stderr == f"mtx-generate-cpp: error: {err['message']}\n", (name, r.stderr)


def test_generate_example_prefix_state_and_speculative(cpp_build, parity_export, tmp_path):
    """mtx-generate-cpp: --save-prefix-state then --prefix-state gives the tokens of the whole prompt;
    --speculative-ngram K gives the tokens of plain decoding, --stats counts accepted drafts; a prompt
    that does not extend the state is one line, exit status 2."""
    export = _spec_export(parity_export, "onnxruntime", 12)
    exe = str(cpp_build / "mtx-generate-cpp")
    prompt = [5, 17, 99, 3, 42, 8, 11] * 3 + [5, 17]
    args = ["--max-new-tokens", "40", "--ids-out"]
    ids = lambda toks: ["--ids", " ".join(map(str, toks))]  # noqa: E731
    want = py_load(export).generate([prompt], max_new_tokens=40)[0]
    plain = _run([exe, str(export), *ids(prompt), *args], timeout=300)
    assert plain.returncode == 0 and plain.stdout.split() == [str(t) for t in want], plain.stderr
    spec = _run([exe, str(export), *ids(prompt), *args, "--speculative-ngram", "3", "--stats"], timeout=300)
    assert spec.returncode == 0 and spec.stdout == plain.stdout, spec.stderr
    stats = spec.stderr.strip().splitlines()
    assert len(stats) == 1 and stats[0].startswith("speculative: "), spec.stderr
    verifications, drafted, accepted = (int(w) for w in stats[0].split()[1::2])
    assert verifications > 0 and 0 < accepted <= drafted <= 3 * verifications, stats
    state = tmp_path / "system.safetensors"
    r = _run([exe, str(export), *ids(prompt[:16]), "--max-new-tokens", "0", "--ids-out", "--save-prefix-state",
              str(state)], timeout=300)
    assert r.returncode == 0 and state.is_file(), r.stderr
    seeded = _run([exe, str(export), *ids(prompt), *args, "--prefix-state", str(state)], timeout=300)
    assert seeded.returncode == 0 and seeded.stdout == plain.stdout, seeded.stderr
    for toks, words in ((prompt[:16], "must add at least one token to the 16 tokens"),
                        ([1] + prompt, "does not start with the 16 tokens"), (prompt[:9], "does not start with")):
        r = _run([exe, str(export), *ids(toks), *args, "--prefix-state", str(state)], timeout=300)
        assert r.returncode == 2 and r.stdout == "" and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert r.stderr.startswith(f"mtx-generate-cpp: error: {state}: ") and words in r.stderr, r.stderr
    r = _run([exe, str(export), *ids(prompt), "--speculative-ngram", "0"], timeout=300)
    assert r.returncode == 2 and "--speculative-ngram: expected an integer in [1, 1024]" in r.stderr, r.stderr


def test_c_abi_prefix_state_and_speculative(cpp_build, parity_export, tmp_path):
    """The C ABI: a state saved after a prefix seeds a session that, given the rest, generates the whole
    prompt's tokens; speculative decoding gives the same tokens and counts accepted drafts; a bad file
    is a status and one line."""
    export = _spec_export(parity_export, "onnxruntime", 12)
    prompt = [5, 17, 99, 3, 42, 8, 11] * 3 + [5, 17]
    want = py_load(export).generate([prompt], max_new_tokens=40, stop_token_ids=[])[0]
    line = "ok " + " ".join(map(str, want))
    state = tmp_path / "state.safetensors"
    assert c_check(cpp_build, export, prompt[:8], 0, env={"MTX_C_CHECK_SAVE": str(state)}) == (0, "ok")
    assert c_check(cpp_build, export, prompt[8:], 40, env={"MTX_C_CHECK_PREFIX": str(state)}) == (0, line)
    r = _run([str(cpp_build / "mtx_c_check"), str(export), "40", *map(str, prompt)], timeout=300,
             env={**os.environ, "MTX_C_CHECK_SPECULATIVE": "3"})
    assert r.returncode == 0 and r.stdout.strip() == line, r.stderr
    v, d, a = (int(x) for x in r.stderr.split()[1:])
    assert v > 0 and 0 < a <= d <= 3 * v, r.stderr
    state.write_bytes(state.read_bytes()[:-3])
    rc, out = c_check(cpp_build, export, prompt[8:], 40, env={"MTX_C_CHECK_PREFIX": str(state)})
    assert rc == 2 and out.startswith(f"error 1 {state}: header: ") and len(out.splitlines()) == 1, out
    rc, out = c_check(cpp_build, export, prompt, 3, env={"MTX_C_CHECK_SPECULATIVE": "-1"})
    assert rc == 2 and out.startswith("error 1 ") and "num_tokens" in out, out


@pytest.mark.parametrize("target", ["onnxruntime", "onnx"])
def test_canonical_chunks_make_turns_bit_identical(cpp_build, parity_export, tmp_path, target):
    """docs/ops.md §1 rule 7: every feed is cut at multiples of the prefill block. A session fed 6 tokens
    then 2 then the rest computes the rest in the same calls as one fed 6 then all the rest (6..8,
    8..12, 12..16, ...), so the logits are the same bits; cut from where each feed starts (6..10,
    10..14 against 8..12, ...) they would not be."""
    export = _spec_export(parity_export, target, 12)
    prompt = [int(t) for t in np.random.default_rng(7).integers(0, 120, 30)]
    base = {"op": "prefix", "export": str(export), "prefill_chunk": 4}
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    check(cpp_build, tmp_path, {**base, "append": [prompt[:6]], "score": prompt[6:], "out": str(a)})
    check(cpp_build, tmp_path, {**base, "append": [prompt[:6], prompt[6:8]], "score": prompt[8:], "out": str(b)})
    vocab = json.loads((export / "mtx.json").read_text())["config"]["vocab_size"]
    la, lb = np.fromfile(a, np.float32).reshape(-1, vocab), np.fromfile(b, np.float32).reshape(-1, vocab)
    assert la.shape[0] == 24 and lb.shape[0] == 22
    assert np.array_equal(la[2:], lb)


def test_speculative_under_full_attention_up_to_the_capacity(cpp_build, parity_export, tmp_path):
    """Full attention (window 0, W = C = 64, layout ring): drafts are capped so that a verification never
    passes the capacity; prompt + new tokens = C exactly, the tokens of plain decoding."""
    export = parity_export("mistral_full", "onnxruntime")
    prompt = [5, 17, 99, 3, 42, 8, 11] * 3 + [5, 17]
    n = 64 - len(prompt)
    want = py_load(export).generate([prompt], max_new_tokens=n, stop_token_ids=[])[0]
    req = {"op": "generate", "export": str(export), "prompts": [prompt], "max_new_tokens": n, "stop": [],
           "prefill_chunk": PREFILL_CHUNK}
    for k in (2, 7):
        got = check(cpp_build, tmp_path, {**req, "speculative": {"num_tokens": k}})
        assert got["tokens"] == [want] and got["stats"][0]["verifications"] > 0, k


def test_generate_example_runs_an_export_with_mistrals_tokenizer(cpp_build, parity_export, mistral_layout_factory,
                                                                 tmp_path):
    """An export carrying Mistral's tekken.json (--tokenizer-mode mistral) loads in C++ (tekken.json
    hashed like every file), runs on token ids giving Python's tokens, and reads text with tekken.json:
    the prompt's ids are mistral_common's (the tiny model's 128 ids are all Tekken special ids, so
    "Hello" is refused by the model's vocabulary, naming mistral_common's first id), and generated ids
    print as mistral_common's decode (special ids read as nothing)."""
    mistral_common = pytest.importorskip("mistral_common")
    from mtx.tokenizer import MistralTextTokenizer

    ckpt = tmp_path / "ckpt"
    shutil.copytree(mistral_layout_factory("mistral"), ckpt,
                    ignore=shutil.ignore_patterns("tokenizer.json", "tokenizer_config.json"))
    shutil.copy(Path(mistral_common.__file__).parent / "data" / "tekken_240718.json", ckpt / "tekken.json")
    out = parity_export("mistral", "onnxruntime", checkpoint=ckpt)
    assert (out / "tekken.json").is_file() and not (out / "tokenizer.json").exists()
    exe = str(cpp_build / "mtx-generate-cpp")
    r = _run([exe, str(out), "--ids", " ".join(map(str, PROMPT)), "--max-new-tokens", "8", "--ids-out"], timeout=300)
    assert r.returncode == 0, r.stderr
    want = py_load(out).generate([PROMPT], max_new_tokens=8)[0]
    assert r.stdout.split() == [str(t) for t in want]
    mt = MistralTextTokenizer(out / "tekken.json")
    r = _run([exe, str(out), "--ids", " ".join(map(str, PROMPT)), "--max-new-tokens", "8"], timeout=300)
    assert r.returncode == 0 and r.stdout == mt.decode(want) + "\n", r.stderr  # the text, then a newline
    hello = mt.encode("Hello", add_special_tokens=False).ids
    r = _run([exe, str(out), "--prompt", "Hello"], timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
    assert f"token id {hello[0]}" in lines[0] and "out of range" in lines[0], r.stderr
    path = tmp_path / "hello.json"
    path.write_text(json.dumps(["Hello", "naïve [INST] </s> <s>"]))
    got = check(cpp_build, tmp_path, {"op": "tokenize", "tokenizer": str(out), "lines": str(path)})
    assert got["ids"] == [mt.encode(t, add_special_tokens=False).ids for t in json.loads(path.read_text())]

"""scripts/benchlib.py and bench_peers.py helpers of the llama.cpp peer (no llama.cpp needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import benchlib  # noqa: E402
import bench_peers  # noqa: E402

spm = pytest.importorskip("sentencepiece")


@pytest.mark.parametrize("vocab", [259, 1000, 32000])
def test_sentencepiece_vocab_has_exactly_vocab_size_pieces(tmp_path: Path, vocab: int) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(benchlib.sentencepiece_vocab(tmp_path / "tokenizer.model", vocab)))
    assert sp.vocab_size() == vocab
    assert (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert [sp.id_to_piece(i) for i in (0, 1, 2, 3, 258)] == ["<unk>", "<s>", "</s>", "<0x00>", "<0xFF>"]
    assert all(sp.is_byte(i) for i in range(3, 259)) and sp.is_control(1) and sp.is_unknown(0)
    assert len({sp.id_to_piece(i) for i in range(vocab)}) == vocab  # pieces are distinct
    assert all(0 <= i < vocab for i in sp.encode("héllo"))  # byte fallback covers any text


def test_sentencepiece_vocab_refuses_too_few_pieces(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        benchlib.sentencepiece_vocab(tmp_path / "tokenizer.model", 258)


def test_linked_copy_leaves_the_checkpoint_alone(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    (ckpt / "tokenizer.json").write_text("{}")
    (ckpt / "model.safetensors").write_bytes(b"w" * 10)
    dst = benchlib.linked_copy(ckpt, tmp_path / "copy", skip=["tokenizer.json"])
    assert sorted(f.name for f in dst.iterdir()) == ["config.json", "model.safetensors"]
    assert benchlib.disk_bytes(dst) == 12 and benchlib.disk_bytes(dst / "model.safetensors") == 10


def test_first_divergence() -> None:
    assert bench_peers.first_divergence([1, 2, 3], [1, 2, 3]) is None
    assert bench_peers.first_divergence([1, 2, 3], [1, 5, 3]) == 1
    assert bench_peers.first_divergence([1, 2], [1, 2, 3]) == 2


def test_every_quantisation_has_a_pair() -> None:
    assert set(bench_peers.MTX_EXPORT_ARGS) == set(bench_peers.GGUF_TYPES) == set(bench_peers.QUANT_NOTES) \
        == set(bench_peers.QUANTS)
    assert set(benchlib.MODELS) == {"mistral-125m", "mixtral-8x"}

"""``mtx parity --quality``: how much a (quantised) export changes the model, where exact logits can't match.

The export and the float32 PyTorch model built from CKPT (no fake quant: the model as trained) score
the same text teacher-forced, chunk by chunk through their rolling buffers. Reported: perplexity of
each (``exp`` of the mean negative log-likelihood of every next token), their ratio, and top-1
agreement (the share of positions where both predict the same next token).

The default text is held out from the built-in models' training data (Python's standard library,
scripts/make_default_model.py): mtx's own source files, in sorted order.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mtx.errors import UsageError
from mtx.tokenizer import encode_checked

DEFAULT_TOKENS = 2048
CHUNK = 64


@dataclass(frozen=True)
class QualityReport:
    """Perplexities over ``tokens`` scored tokens and the top-1 agreement of export and reference."""

    text: str  # the file scored, or "mtx sources (held out)"
    tokens: int
    reference_perplexity: float
    export_perplexity: float
    perplexity_ratio: float  # export / reference
    top1_agreement: float
    quantization: dict[str, Any] | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def held_out_text() -> str:
    """mtx's own Python sources (not in the built-in models' training set), concatenated."""
    root = Path(__file__).resolve().parents[1]
    return "\n".join(p.read_text() for p in sorted(root.rglob("*.py")))


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _nll_and_top1(backend: Any, ids: np.ndarray, chunk: int):
    """Per scored position t (predicting ids[t+1]): negative log-likelihood and argmax, chunk by chunk."""
    state = backend.new_state(1)
    for start in range(0, len(ids) - 1, chunk):
        part = ids[start:min(start + chunk, len(ids) - 1)]
        logits = backend.run(state, slice(0, 1), part[None], np.asarray([start], np.int64), last_only=False)[0]
        lp = _log_softmax(logits)
        nxt = ids[start + 1:start + 1 + len(part)]
        yield -lp[np.arange(len(part)), nxt], logits.argmax(-1)


def run_quality(checkpoint: str | Path | None, out: str | Path, text_file: str | Path | None = None,
                max_tokens: int = DEFAULT_TOKENS, threads: int | None = None) -> QualityReport:
    """Score ``text_file`` (default :func:`held_out_text`) with the export OUT and the float32 model of CKPT."""
    from mtx.assets import resolve_checkpoint
    from mtx.manifest import read_manifest
    from mtx.runtime.artifact import load_artifact
    from mtx.runtime.torch_backend import TorchBackend

    out = Path(out)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 2:
        raise UsageError(f"max_tokens: expected an integer >= 2, got {max_tokens!r}", params=("max_tokens",))
    if text_file is not None:
        text_file = Path(text_file)
        if not text_file.is_file():
            raise UsageError(f"text {text_file}: no such file", params=("text",))
        try:
            text, label = text_file.read_text(), str(text_file)
        except UnicodeDecodeError:
            raise UsageError(f"text {text_file}: not UTF-8 text", params=("text",)) from None
    else:
        text, label = held_out_text(), "mtx sources (held out)"
    manifest = read_manifest(out)
    gen = load_artifact(out, None, threads=threads)
    if gen.tokenizer is None:
        raise UsageError(f"{out}: no tokenizer.json to encode the text with", params=("text",))
    limit = min(max_tokens, manifest.kv_plan.context_limit(manifest.max_position) or max_tokens)
    ids = np.asarray(encode_checked(gen.tokenizer, text, "text")[:limit], np.int64)
    if len(ids) < 2:
        raise UsageError("text: encodes to fewer than 2 tokens", params=("text",))
    reference = TorchBackend.from_checkpoint(resolve_checkpoint(checkpoint), "float32", capacity=manifest.reference_plan,
                                             max_batch=1, threads=threads)
    nll_ref, nll_exp, agree = [], [], 0
    for (n_r, t_r), (n_e, t_e) in zip(_nll_and_top1(reference, ids, CHUNK), _nll_and_top1(gen.backend, ids, CHUNK)):
        nll_ref.append(n_r)
        nll_exp.append(n_e)
        agree += int((t_r == t_e).sum())
    ref_ppl = float(np.exp(np.concatenate(nll_ref).mean()))
    exp_ppl = float(np.exp(np.concatenate(nll_exp).mean()))
    scored = len(ids) - 1
    return QualityReport(label, scored, ref_ppl, exp_ppl, exp_ppl / ref_ppl, agree / scored,
                         None if manifest.quantization is None else {
                             k: v for k, v in asdict(manifest.quantization).items() if k != "tensors"})

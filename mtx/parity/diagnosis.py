"""Turn where the errors are into a likely cause.

The known failures of this model family leave recognisable traces in *which positions* fail:

* **window off by one** — positions before the error onset match, the errors begin exactly at W
  (the first position whose window drops a key: the artifact still sees it) or at W' < W (the
  artifact already drops keys the model keeps) and then persist, in prefill and decode alike;
* **KV buffer written before it is read** — errors only at positions fed by multi-token calls
  whose writes reach resident keys (a chunk that writes a position >= C), while single-token decode
  steps match and the last token of each chunk (which needs none of the overwritten keys) matches;
* **router decisions differ** (router softmax/top-k not in float32) — sporadic tokens in one
  layer's MoE output, attention output of that layer matching, at tokens where the reference router's
  k-th and (k+1)-th expert probabilities are nearly tied;
* errors from position 0 (weights, RoPE, scale), or beginning where the buffer wraps (slot arithmetic).

With ``--per-layer`` the analysis runs on the first layer value that fails (layer order, attention
before the FFN/MoE): there the inputs still match, so the pattern is the cause's own. From logits
alone, errors spread to later positions through the KV buffers of later layers; the rules then ask
for evidence that survives the spreading (the onset, clean late decode steps, near-tied routers at
each fresh error). Nothing here knows how an artifact was made: only the measured masks go in.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtx.parity.schedule import Schedule

#: A token's router is "nearly tied" in a layer if its top-k margin is below this fraction of that
#: layer's median margin over the run.
NEAR_TIE = 0.1
#: An MoE layer "adds" an error at a token when its output error is this many times its input's.
JUMP = 10.0
STAGE_NAMES = {"attention": "attention", "moe": "MoE", "ffn": "FFN"}


@dataclass
class Finding:
    """One diagnosis: ``code`` names the pattern, ``line`` says where and the likely cause in one line."""

    code: str
    line: str
    first_position: int | None = None
    layer: int | None = None
    stage: str | None = None  # "attention", "ffn", "moe" or "output" (after the last layer)
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "line": self.line, "first_position": self.first_position, "layer": self.layer,
                "stage": self.stage, "evidence": self.evidence}


@dataclass
class _Layout:
    """Per position [T]: the call feeding it, that call's length, and whether it is the call's last token."""

    call_len: np.ndarray
    call_start: np.ndarray
    last_in_call: np.ndarray

    @classmethod
    def of(cls, sched: Schedule) -> _Layout:
        t = sched.positions
        call_len, call_start, last = np.zeros(t, np.int64), np.zeros(t, np.int64), np.zeros(t, bool)
        for c in sched.calls:
            call_len[c.start:c.stop], call_start[c.start:c.stop] = c.length, c.start
            last[c.stop - 1] = True
        return cls(call_len, call_start, last)


def _plural(n: int, what: str) -> str:
    return f"{n} {what}" + ("" if n == 1 else "s")


def _spans(mask: np.ndarray) -> str:
    """'3-5, 9, 12-20' for the True positions of ``mask`` (at most 6 spans shown)."""
    idx = np.flatnonzero(mask)
    if idx.size == 0:
        return "none"
    breaks = np.flatnonzero(np.diff(idx) > 1)
    starts, ends = np.r_[idx[0], idx[breaks + 1]], np.r_[idx[breaks], idx[-1]]
    parts = [f"{a}" if a == b else f"{a}-{b}" for a, b in zip(starts, ends)]
    return ", ".join(parts[:6]) + (f", … ({len(parts)} spans)" if len(parts) > 6 else "")


@dataclass
class Observed:
    """What was measured for one backend. Positions [T]; layer arrays [L, 2, T] (after attention, after block)."""

    bad: np.ndarray  # logits outside tolerance
    error: np.ndarray  # max |a - r| of the logits
    top1: np.ndarray  # artifact argmax == reference argmax
    layer_bad: np.ndarray | None = None
    layer_error: np.ndarray | None = None


def diagnose(obs: Observed, sched: Schedule, *, is_moe: bool, top_k: int, router_margin: np.ndarray | None = None,
             dtype: str = "float32") -> Finding:
    """The most specific finding for one backend (``dtype``: the export's T).

    ``router_margin`` [L, T] float32: the reference router's k-th minus (k+1)-th probability per MoE
    layer and token (NaN for dense layers), or None.
    """
    t = sched.positions
    if not obs.bad.any() and (obs.layer_bad is None or not obs.layer_bad.any()):
        return Finding("match", f"all {t} positions within tolerance")
    layout = _Layout.of(sched)
    flips = int((~obs.top1 & obs.bad).sum())

    # Where the error originates: the first failing layer value (per-layer), else the logits.
    layer, stage, mask = None, None, obs.bad
    if obs.layer_bad is not None:
        failing = [(lay, s) for lay in range(obs.layer_bad.shape[0]) for s in (0, 1) if obs.layer_bad[lay, s].any()]
        if failing:
            layer, s = failing[0]
            stage = "attention" if s == 0 else ("moe" if is_moe else "ffn")
            mask = obs.layer_bad[layer, s]
        else:
            stage = "output"
    onset = int(np.flatnonzero(mask)[0])
    evidence: dict[str, Any] = {"failing_positions": int(mask.sum()), "positions": t, "spans": _spans(mask),
                                "top1_flips": flips}
    hint = "" if obs.layer_bad is not None else " (--per-layer shows the layer)"

    def finding(code: str, cause: str, at_layer: int | None = layer, at_stage: str | None = stage,
                first: int = onset, **more: Any) -> Finding:
        evidence.update(more)
        where = {None: "", "output": "logits only (every layer matches): "}.get(
            at_stage, f"layer {at_layer} {STAGE_NAMES.get(at_stage or '', '')} output: ")
        return Finding(code, f"{where}{cause}", first, at_layer, at_stage, evidence)

    if stage == "output":
        return finding("output_mismatch", f"errors from position {onset} in the logits while every layer's residual "
                                          f"stream matches → final norm or output projection (lm_head) differs")

    rules = []
    if stage in (None, "attention"):
        rules.append(_window_rule)
    if is_moe and router_margin is not None and stage in (None, "moe"):
        rules.append(_router_rule)
    if stage in (None, "attention"):
        rules += [_buffer_written_rule, _buffer_wrap_rule]
    origin_error = obs.error if layer is None else obs.layer_error[layer, 0 if stage == "attention" else 1]
    ctx = _Context(obs, sched, layout, mask, origin_error, onset, layer, stage, top_k, flips, router_margin, hint,
                   dtype)
    for rule in rules:
        found = rule(ctx)
        if found is not None:
            code, cause, more = found
            return finding(code, cause, at_layer=more.pop("at_layer", layer), at_stage=more.pop("at_stage", stage),
                           first=more.pop("first", onset), **more)

    persist = float(mask[onset:].mean())
    if onset == 0 and persist >= 0.5:
        what = {"attention": "RoPE, scale, head layout or the attention projections",
                "moe": "expert weights or their layout (w1/w3/w2), or routing for every token",
                "ffn": "FFN weights (w1/w3/w2)"}.get(stage or "", "weights, RoPE or an op's math")
        return finding("mismatch_from_start", f"errors from position 0 and at {persist:.0%} of positions, not tied "
                                              f"to the window or the buffer → {what} differ{hint}")
    c0 = int(layout.call_start[onset])
    return finding("unexplained", f"errors begin at position {onset} (call {c0}-{c0 + layout.call_len[onset] - 1}) at "
                                  f"positions {evidence['spans']}; no known pattern (onset at W, chunk-only errors, "
                                  f"near-tied routers) matches{hint}")


@dataclass
class _Context:
    obs: Observed
    sched: Schedule
    layout: _Layout
    mask: np.ndarray  # failing positions of the origin (first failing layer value, or the logits)
    error: np.ndarray  # max |a - r| of the origin per position
    onset: int
    layer: int | None
    stage: str | None
    top_k: int
    flips: int
    router_margin: np.ndarray | None
    hint: str
    dtype: str

    @property
    def multi(self) -> np.ndarray:
        return self.layout.call_len >= 2

    def steps_up(self) -> bool:
        """Is the onset a step: failing positions' median error >= JUMP x the largest error before it?

        A real window or buffer error turns exact positions into clearly wrong ones; rounding noise
        that happens to cross the tolerance somewhere does not.
        """
        if self.onset == 0:
            return False
        failing = self.error[self.onset:][self.mask[self.onset:]]
        return float(np.median(failing)) >= JUMP * max(float(self.error[:self.onset].max()), 1e-30)

    def decode_after(self, start: int) -> np.ndarray:
        """Single-token positions at or after ``start`` and past the window (where a window error shows)."""
        return ~self.multi & (np.arange(self.sched.positions) >= max(start, self.sched.effective_window))


_Rule = tuple[str, str, dict[str, Any]]


def _window_rule(c: _Context) -> _Rule | None:
    """Clean before the onset, the onset at W (or at W' < W), errors persisting after it, decode included."""
    w, mask, onset = c.sched.effective_window, c.mask, c.onset
    if not c.sched.window or not 1 <= onset <= w or not c.steps_up():
        return None
    after = mask[onset:]
    decode = c.decode_after(onset)
    decode_bad = int((mask & decode).sum())
    if after.mean() < 0.5 or (decode.any() and decode_bad / decode.sum() < 0.5):
        return None
    tail = (f"persist ({int(after.sum())}/{after.size} positions from there, {decode_bad}/{int(decode.sum())} "
            f"decode steps)")
    if onset == w:
        cause = (f"errors begin exactly at position {w} = W (the first position whose window drops a key) while "
                 f"positions 0-{w - 1} match, and {tail} → window off by one: the artifact attends to more than "
                 f"W = {w} keys (check the window attribute / local_window_size){c.hint}")
    else:
        cause = (f"errors begin at position {onset} < W = {w} while positions 0-{onset - 1} match, and {tail} → "
                 f"window off by one: the artifact attends to only {onset} keys, not W = {w} (check the window "
                 f"attribute / local_window_size){c.hint}")
    return "window_off_by_one", cause, {"artifact_window": "> W" if onset == w else onset}


def _buffer_written_rule(c: _Context) -> _Rule | None:
    """Errors in multi-token chunks that write over resident keys; single-token calls match."""
    mask, onset, lay, cap, w = c.mask, c.onset, c.layout, c.sched.capacity, c.sched.effective_window
    multi, single = c.multi, ~c.multi
    call_end = int(lay.call_start[onset] + lay.call_len[onset] - 1)
    if not multi[onset] or call_end < cap or not c.steps_up():
        return None
    chunk_only = not (mask & single).any()
    tail = np.flatnonzero(single)[-min(w, int(single.sum())):] if single.any() else np.array([], np.int64)
    tail_clean = tail.size > 0 and not mask[tail].any()
    last_ok = not (mask & multi & lay.last_in_call).any()
    if c.stage == "attention":
        if not (chunk_only and c.decode_after(0).any()):
            return None
        shape = "errors only at multi-token prefill positions"
        decode = "single-token decode steps match"
    else:
        if not (tail_clean and (chunk_only or mask[multi].mean() > mask[single].mean())):
            return None
        shape = "errors start in a multi-token prefill chunk" if not chunk_only else \
            "errors only at multi-token prefill positions"
        decode = "single-token decode steps match" if chunk_only else \
            f"decode steps fail only until the prefilled keys leave the window (last {tail.size} match)"
    onset_call = [int(lay.call_start[onset]), call_end]
    cause = (f"{shape} (first at {onset}, in chunk {onset_call[0]}-{call_end} which writes position >= C = {cap}), "
             f"{decode}{', the last token of each chunk matches' if last_ok else ''} → KV buffer written before it "
             f"is read: keys still needed within the chunk are overwritten (attend first, then write; docs/ops.md §1 "
             f"rule 5){c.hint}")
    return "kv_written_before_read", cause, {"chunk_only": chunk_only, "last_token_of_chunk_matches": last_ok,
                                             "onset_call": onset_call}


def _buffer_wrap_rule(c: _Context) -> _Rule | None:
    cap, onset = c.sched.capacity, c.onset
    if onset == 0 or onset % cap or c.mask[onset:].mean() < 0.5 or not c.steps_up():
        return None
    return "buffer_wrap", (f"errors begin at position {onset} = {onset // cap}·C where the buffer wraps, earlier "
                           f"positions match → slot arithmetic (p mod C) or resident positions wrong "
                           f"(docs/ops.md §1 rules 1, 3){c.hint}"), {}


def _near_tied(margin: np.ndarray) -> np.ndarray:
    return margin < NEAR_TIE * float(np.nanmedian(margin))


def _router_rule(c: _Context) -> _Rule | None:
    """Tokens where an MoE output error jumps, nearly tied in that layer's reference router.

    Per-layer: in MoE layers from the origin on, tokens whose error after the block is out of
    tolerance and >= JUMP times the error after attention (the MoE added it). Logits only: tokens
    whose logits error is out of tolerance and >= JUMP times the run's median, counting only the
    first of consecutive ones (later ones may inherit the error through the KV buffers).
    """
    obs, margin = c.obs, c.router_margin
    candidates: list[tuple[int, np.ndarray]] = []
    if obs.layer_bad is not None:
        for lay in range(c.layer or 0, margin.shape[0]):
            entering = np.maximum(obs.layer_error[lay, 0], 1e-30)
            jump = obs.layer_bad[lay, 1] & (obs.layer_error[lay, 1] >= JUMP * entering)
            if jump.any() and not np.isnan(margin[lay]).all():
                candidates.append((lay, jump))
    else:
        out = obs.bad & (obs.error >= JUMP * float(np.median(obs.error)))
        fresh = out & ~np.r_[False, out[:-1]]
        if fresh.sum() >= 2:
            candidates += [(lay, fresh) for lay in range(margin.shape[0]) if not np.isnan(margin[lay]).all()]
    best = None
    for lay, tokens in candidates:
        tied = _near_tied(margin[lay])
        share = float(tied[tokens].mean())
        if share >= 0.5 and (best is None or (obs.layer_bad is None and share > best[2])):
            best = (lay, tokens, share)
            if obs.layer_bad is not None:
                break  # the first MoE layer where it happens
    if best is None:
        return None
    lay, tokens, share = best
    m = margin[lay]
    median_all, median_tokens = float(np.nanmedian(m)), float(np.median(m[tokens]))
    where = "" if obs.layer_bad is not None else f"likely layer {lay}: "
    noise = ""
    if obs.layer_bad is not None and c.layer is not None and (c.layer, c.stage) != (lay, "moe"):
        noise = (f"; layer {c.layer} {STAGE_NAMES.get(c.stage or '', '')} output already differs slightly at "
                 f"{c.mask.mean():.0%} of positions (routing weights rounded)")
    kind = "errors jump (>= 10x the error entering the layer)" if obs.layer_bad is not None else \
        "sporadic errors start"
    if c.dtype == "float32":
        why = "router softmax/top-k not in float32 (near-tied experts resolve differently)"
    else:
        why = (f"near-tied experts resolve differently; in a {c.dtype} export the router input is rounded, which "
               f"can flip them even with float32 routing — add the torch backend (the PyTorch model in {c.dtype}) to "
               f"tell: same tokens flip there → inherent to {c.dtype}; only here → router softmax/top-k not in "
               f"float32")
    cause = (f"{where}{kind} at {_plural(int(tokens.sum()), 'token')} ({_spans(tokens)}), {share:.0%} of them where "
             f"the reference router's top-{c.top_k} margin is nearly tied (median {median_tokens:.1e} vs "
             f"{median_all:.1e} over all tokens), {_plural(c.flips, 'top-1 flip')} → router decisions differ: "
             f"{why}{noise}{c.hint}")
    more = {"router": {"layer": lay, "tokens": int(tokens.sum()), "near_tied_share": share,
                       "margin_at_tokens": median_tokens, "margin_median": median_all}}
    if obs.layer_bad is not None:
        more.update(at_layer=lay, at_stage="moe", first=int(np.flatnonzero(tokens)[0]))
    return "router_precision", cause, more

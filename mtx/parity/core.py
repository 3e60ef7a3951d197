"""``mtx parity``: run an export and the PyTorch reference on the same inputs and say where they differ.

The reference is the float32 model built from CKPT (independent of the artifact: its own rolling
buffer of W slots, or of the whole run for full attention). Both sides see the same calls
(:mod:`mtx.parity.schedule`): a chunked prefill, then single-token decoding teacher-forced with the
reference's greedy token (the artifact's own greedy choice is recorded, not fed). Every position is
measured (:mod:`mtx.parity.metrics`), with ``per_layer`` also each layer's residual stream after
attention and after the block, taken from the artifact itself (``layer_outputs`` of mtx.json).
Calls are processed one at a time and then dropped, so memory does not grow with the run.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from mtx import rolling_kv
from mtx.errors import MtxError, UsageError
from mtx.manifest import Manifest, read_manifest
from mtx.parity import diagnosis
from mtx.parity.compare import BackendComparison, PairResult
from mtx.parity.metrics import LogitErrors, RowErrors
from mtx.parity.options import ParityOptions, Tolerance, tolerance_for
from mtx.parity.runners import BackendRunner, Runner, TorchRunner
from mtx.parity.schedule import Schedule, plan_schedule

if TYPE_CHECKING:
    from mtx.models.checkpoint import Checkpoint

REFERENCE = "reference"


class BackendFailed(MtxError):
    """An artifact backend raised while running a call: the artifact does not run (exit code 1)."""

    exit_code = 1


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    return (lines[-1] if lines else type(e).__name__).split("Status Message: ")[-1]
LOGIT_FIELDS = ("max_abs", "mean_abs", "rel", "ref_max", "cosine", "top1", "top5_overlap", "reference_token",
                "artifact_token")


@dataclass
class BackendResult:
    """One artifact backend over the run. Arrays are per position [T] (``layers``: [L, 2, T])."""

    name: str
    status: str  # "ran" or "skipped"
    reason: str | None = None
    logits: dict[str, np.ndarray] = field(default_factory=dict)  # LOGIT_FIELDS -> [T]
    layer_max_abs: np.ndarray | None = None
    layer_rel: np.ndarray | None = None
    layer_ref_max: np.ndarray | None = None
    within: np.ndarray | None = None  # [T] bool
    layer_within: np.ndarray | None = None  # [L, 2, T] bool
    finding: diagnosis.Finding | None = None

    @property
    def passed(self) -> bool | None:
        return None if self.status != "ran" else bool(self.within.all())


@dataclass
class ParityReport:
    """Everything ``mtx parity`` measured; :mod:`mtx.parity.report` renders it."""

    checkpoint: Path
    out: Path
    manifest: Manifest
    schedule: Schedule
    tolerance: Tolerance
    input_tokens: np.ndarray  # [T] the token fed at each position
    backends: list[BackendResult]
    comparisons: list[PairResult]
    router_margin: np.ndarray | None  # [L, T] reference router top-k margin (MoE)
    prompt: str | None
    seed: int
    per_layer: bool
    notes: list[str] = field(default_factory=list)
    findings: list[diagnosis.Finding] = field(default_factory=list)  # run-level (across backends)

    @property
    def ran(self) -> list[BackendResult]:
        return [b for b in self.backends if b.status == "ran"]

    @property
    def passed(self) -> bool:
        return all(b.passed for b in self.ran) and all(c.passed for c in self.comparisons)

    @property
    def exit_code(self) -> int:
        return 0 if self.passed else 1


# --------------------------------------------------------------------------------------------------
# Inputs


def _check_checkpoint(ckpt_root: Path, config: dict[str, Any], manifest: Manifest, out: Path) -> None:
    """CKPT must be the model the export was made from (same config, whatever its file layout)."""
    theirs = manifest.config
    differing = sorted(k for k in set(config) | set(theirs) if k != "source_format" and config.get(k) != theirs.get(k))
    if differing:
        k = differing[0]
        raise UsageError(f"{ckpt_root}: config does not match {out / 'mtx.json'}: {k} is {config.get(k)!r} in the "
                         f"checkpoint, {theirs.get(k)!r} in the export; give the checkpoint the export was made from")


def _prompt_ids(out: Path, prompt: str, vocab: int) -> list[int]:
    from mtx.tokenizer import encode_checked, load_tokenizer

    tokenizer = load_tokenizer(out)
    if tokenizer is None:
        raise UsageError(f"prompt: {out} has no tokenizer.json; use prompt_len N for random token ids",
                         params=("prompt", "prompt_len"))
    origin = getattr(tokenizer, "path", out / "tokenizer.json")  # Mistral's file, or tokenizer.json
    ids = encode_checked(tokenizer, prompt, str(origin))
    if not ids:
        raise UsageError("prompt: the text encodes to no tokens", params=("prompt",))
    bad = [i for i in ids if not 0 <= i < vocab]
    if bad:
        raise UsageError(f"prompt: token id {bad[0]} from {origin} is outside the vocabulary "
                         f"of {vocab}", params=("prompt",))
    return ids


# --------------------------------------------------------------------------------------------------
# Backends


def tensorrt_unavailable(manifest: Manifest, out: Path) -> str | None:
    """Why the TensorRT backend cannot run this export here, or None if it can."""
    if not manifest.engine:
        return f"{out} has no TensorRT engine ({manifest.engine_status})"
    from mtx import tensorrt

    ok, why = tensorrt.available()  # the checks TrtBackend makes before it opens the engine
    if not ok:
        return why
    import torch

    return None if torch.cuda.is_available() else "no CUDA GPU"


def _default_backends(manifest: Manifest) -> list[str]:
    return ["onnxruntime"] + (["tensorrt"] if manifest.engine else [])


def _open_backend(name: str, out: Path, manifest: Manifest, ck: Checkpoint, per_layer: bool) -> Runner:
    if name == "onnxruntime":
        from mtx.runtime.ort_backend import OrtBackend

        pairs = [(lo.after_attention, lo.after_block) for lo in manifest.layer_outputs] if per_layer else []
        # threads sleep between calls: spinning ones would take the cores from the reference run in between
        backend = OrtBackend(out, manifest, max_batch=1, extra_outputs=[n for p in pairs for n in p],
                             spin_wait=False)
        return BackendRunner(name, backend, pairs)
    if name == "torch":
        from mtx.models import build_model

        return TorchRunner(name, build_model(ck, manifest.dtype, quantization=manifest.quantization),
                           manifest.reference_plan)
    from mtx.runtime.trt_backend import TrtBackend  # only reached when tensorrt_unavailable() is None

    return BackendRunner(name, TrtBackend(out, manifest, max_batch=1))


# --------------------------------------------------------------------------------------------------
# The run


def run_parity(checkpoint: str | Path | None, out: str | Path, options: ParityOptions = ParityOptions(),
               progress: Callable[[int, int], None] | None = None) -> ParityReport:
    """Run the parity check; raises MtxError on bad input, else returns the report (pass or fail).

    ``progress(done, total)`` is called after each engine call.
    """
    options.validate()
    out = Path(out)
    if not out.exists():
        raise UsageError(f"{out}: no such folder (OUT must be an `mtx export` folder)")
    manifest = read_manifest(out)
    from mtx.assets import resolve_checkpoint
    from mtx.models.checkpoint import Checkpoint

    ck = Checkpoint(resolve_checkpoint(checkpoint))
    _check_checkpoint(ck.root, ck.config.to_dict(), manifest, out)
    cfg = ck.config
    quant = manifest.quantization
    int8_activations = quant is not None and quant.accuracy_level == 4
    tolerance = tolerance_for(manifest.dtype, options.atol, options.rtol, int8_activations=int8_activations)

    prompt_ids = _prompt_ids(out, options.prompt, cfg.vocab_size) if options.prompt is not None else None
    kv = manifest.kv_plan
    window, capacity, max_position = manifest.window, manifest.capacity, manifest.max_position
    per_layer_note = None
    if window is None or capacity is None:  # per-layer windows: follow the smallest window, stay in the context
        layer = min((l for l, w in enumerate(kv.windows) if w), key=lambda l: kv.windows[l], default=0)
        window, capacity = kv.windows[layer], kv.capacities[layer]
        max_position = kv.context_limit(max_position)
        per_layer_note = (f"per-layer windows {list(kv.windows)} (capacities {list(kv.capacities)}): the schedule "
                          f"follows the smallest window, every position below the full layers' capacity")
    sched = plan_schedule(window=window, capacity=capacity, max_position=max_position,
                          vocab_size=cfg.vocab_size, prompt_ids=prompt_ids, prompt_len=options.prompt_len,
                          steps=options.steps, chunk=options.chunk, seed=options.seed)
    notes = list(sched.notes) + ([per_layer_note] if per_layer_note else [])
    if quant is not None:
        notes.append(f"quantised export ({quant.bits}-bit, blocks of {quant.block_size}, {quant.scheme}): the reference "
                     f"has the same dequantised weights (fake quant); --quality compares with the float model")
    if int8_activations:
        notes.append("accuracy_level 4: ONNX Runtime quantises activations to int8 inside MatMulNBits/QMoE, so "
                     "logits are not exact; export with --accuracy-level 0 for the exact check")

    names = list(options.backends) if options.backends else _default_backends(manifest)
    results: dict[str, BackendResult] = {}
    runners = _open_runners(names, out, manifest, ck, options, results, notes)

    from mtx.models import build_model

    # the reference's own minimal buffers: the run's positions (full layers), or each window
    ref_capacity = rolling_kv.plan_kv(cfg.windows, cfg.max_position_embeddings,
                                      rolling_kv.capacity_for(sched.window, sched.positions)
                                      if kv.uniform else sched.positions)
    # a quantised export's reference has the same dequantised weights (fake quant, docs/ops.md §7)
    reference = TorchRunner(REFERENCE, build_model(ck, "float32", quantization=manifest.quantization,
                                                   export_dtype=manifest.dtype),
                            ref_capacity, router_margins=cfg.is_moe)
    comparison, router_margin, input_tokens = _compare_calls(reference, runners, sched, tolerance, options.per_layer,
                                                             results, progress)

    report = ParityReport(ck.root, out, manifest, sched, tolerance, input_tokens,
                          [results[n] for n in names], comparison.results if comparison else [], router_margin,
                          options.prompt, options.seed, options.per_layer, notes)
    _judge(report, cfg.is_moe, cfg.num_experts_per_tok)
    return report


def _open_runners(names: list[str], out: Path, manifest: Manifest, ck: Checkpoint, options: ParityOptions,
                  results: dict[str, BackendResult], notes: list[str]) -> list[Runner]:
    """Runners of the backends that can run here; a TensorRT backend that cannot is recorded in
    ``results`` as skipped (or refused when asked for by name)."""
    if "tensorrt" in names:
        reason = tensorrt_unavailable(manifest, out)
        if reason and options.backends:
            raise UsageError(f"backends tensorrt: cannot run here: {reason}", params=("backends",))
        if reason:
            results["tensorrt"] = BackendResult("tensorrt", "skipped", reason)
    runners = []
    for name in (n for n in names if n not in results):
        try:
            runners.append(_open_backend(name, out, manifest, ck, options.per_layer))
        except MtxError:
            raise
        except Exception as e:  # noqa: BLE001 - a runtime that cannot load the artifact: one line, exit 2
            raise UsageError(f"{out}: the {name} backend cannot load this export: {_first_line(e)}") from e
    if options.per_layer:
        for r in runners:
            if not r.has_layers:
                notes.append(f"per-layer: not available for {r.name} (an engine's outputs are fixed when it is "
                             f"built); its logits are compared")
    return runners


def _compare_calls(reference: TorchRunner, runners: list[Runner], sched: Schedule, tolerance: Tolerance,
                   per_layer: bool, results: dict[str, BackendResult],
                   progress: Callable[[int, int], None] | None
                   ) -> tuple[BackendComparison | None, np.ndarray | None, np.ndarray]:
    """Run every call of ``sched`` on the reference and the runners, filling ``results`` with per-position
    errors; returns the backend-vs-backend comparison, the router margins [L, T] and the input tokens [T]."""
    cfg = reference.model.cfg
    t, n_layers = sched.positions, cfg.num_layers
    for r in runners:
        res = BackendResult(r.name, "ran", logits={k: np.zeros(t, np.float64) for k in LOGIT_FIELDS})
        if per_layer and r.has_layers:
            res.layer_max_abs, res.layer_rel, res.layer_ref_max = (np.zeros((n_layers, 2, t)) for _ in range(3))
        results[r.name] = res
    comparison = BackendComparison([r.name for r in runners]) if len(runners) >= 2 else None
    router_margin = np.full((n_layers, t), np.nan, np.float32) if cfg.is_moe else None
    input_tokens = np.zeros(t, np.int64)

    next_token = 0
    for i, call in enumerate(sched.calls):
        ids = np.asarray(sched.prompt_ids[call.start:call.stop] if call.phase == "prefill" else [next_token], np.int64)
        input_tokens[call.start:call.stop] = ids
        ref = reference.run(ids, call.start)
        if router_margin is not None:
            router_margin[:, call.start:call.stop] = ref.router_margin
        outputs = {r.name: _run(r, ids, call) for r in runners}
        for name, got in outputs.items():
            res = results[name]
            err = LogitErrors.of(got.logits, ref.logits)
            for k in LOGIT_FIELDS:
                res.logits[k][call.start:call.stop] = getattr(err, k)
            if res.layer_max_abs is not None:
                lay = RowErrors.of(got.layers, ref.layers)
                res.layer_max_abs[..., call.start:call.stop] = lay.max_abs
                res.layer_rel[..., call.start:call.stop] = lay.rel
                res.layer_ref_max[..., call.start:call.stop] = lay.ref_max
        if comparison is not None:
            limit = tolerance.limit(float(np.abs(ref.logits).max()))
            comparison.add_call(call.start, {n: o.logits for n, o in outputs.items()}, limit)
        next_token = int(ref.logits[-1].argmax())
        if progress:
            progress(i + 1, len(sched.calls))
    return comparison, router_margin, input_tokens


def _run(runner: Runner, ids: np.ndarray, call: Any) -> Any:
    from mtx.runtime.ort_backend import OrtModelError

    try:
        return runner.run(ids, call.start)
    except OrtModelError as e:  # the graph loaded but does not run: a parity failure, not bad input
        raise BackendFailed(f"{runner.name} failed on the {call.phase} call at positions {call.start}-{call.stop - 1}: "
                            f"{str(e).split(' it (', 1)[-1].removesuffix(')')}") from e
    except MtxError:
        raise
    except Exception as e:  # noqa: BLE001 - the artifact fails to run: a parity failure, said in one line
        raise BackendFailed(f"{runner.name} failed on the {call.phase} call at positions {call.start}-{call.stop - 1}: "
                            f"{_first_line(e)}") from e


def _judge(report: ParityReport, is_moe: bool, top_k: int) -> None:
    """Apply the tolerance per position and diagnose each backend; add cross-backend findings."""
    tol = report.tolerance
    for res in report.ran:
        lg = res.logits
        res.within = lg["max_abs"] <= tol.limit(lg["ref_max"])
        if res.layer_max_abs is not None:
            res.layer_within = res.layer_max_abs <= tol.limit(res.layer_ref_max)
        observed = diagnosis.Observed(~res.within, lg["max_abs"], lg["top1"].astype(bool),
                                      None if res.layer_within is None else ~res.layer_within, res.layer_max_abs)
        res.finding = diagnosis.diagnose(observed, report.schedule, is_moe=is_moe, top_k=top_k,
                                         router_margin=report.router_margin, dtype=report.manifest.dtype)
    torch_model = next((r for r in report.ran if r.name == "torch"), None)
    graph = [r for r in report.ran if r is not torch_model]  # backends that run the exported graph
    graph_names = {r.name for r in graph}
    failing = [r for r in graph if not r.passed]
    if torch_model is not None and report.manifest.dtype != "float32":
        dtype = report.manifest.dtype
        for res in failing:
            own = ~res.within
            shared = float((own & ~torch_model.within).sum() / own.sum())
            if shared >= 0.5:
                report.findings.append(diagnosis.Finding(
                    "dtype_inherent", f"{res.name}: the PyTorch model in {dtype} (torch backend) fails at "
                                      f"{shared:.0%} of the same positions → these differences come from {dtype} "
                                      f"itself (rounding; for MoE, near-tied experts flipping), not from the artifact",
                    evidence={"shared_failing": shared}))
            else:
                report.findings.append(diagnosis.Finding(
                    "artifact_specific", f"{res.name}: the PyTorch model in {dtype} (torch backend) fails at only "
                                         f"{shared:.0%} of these positions → the artifact differs from the "
                                         f"specification beyond {dtype} rounding", evidence={"shared_failing": shared}))
    if len(graph) >= 2 and failing:
        pairs = [c for c in report.comparisons if {c.first, c.second} <= graph_names]
        if len(failing) == len(graph) and all(c.passed for c in pairs):
            report.findings.append(diagnosis.Finding(
                "graph_level", f"all runtimes ({', '.join(r.name for r in graph)}) differ from the reference and agree "
                               f"with each other (Polygraphy) → the exported graph itself differs, not one runtime"))
        elif len(failing) < len(graph):
            report.findings.append(diagnosis.Finding(
                "runtime_specific", f"only {', '.join(r.name for r in failing)} differ from the reference → a "
                                    f"problem of that runtime (or of its plugins), not of the exported graph"))

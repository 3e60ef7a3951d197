"""Render a :class:`mtx.parity.core.ParityReport`: JSON object, rich tables, error-vs-position plot.

JSON (``to_json``), one object:

* ``passed``, ``exit_code`` (0 within tolerance, 1 outside it);
* ``checkpoint``, ``export``, ``target``, ``dtype``, ``attention_op``, ``moe_op``;
* ``tolerance``: ``atol``, ``rtol``, ``source``, ``rule``;
* ``run``: ``window``, ``effective_window``, ``capacity``, ``chunk``, ``prompt_len``, ``steps``,
  ``positions``, ``seed``, ``prompt``, ``calls``, ``prefill_chunks`` ([start, length]),
  ``window_boundaries``, ``buffer_wraps``, ``per_layer``;
* ``notes``: where the run is weaker than the default (fewer wraps, ...);
* ``backends``: name -> ``status`` (ran/skipped), ``reason``, ``passed``, ``summary`` (positions,
  failing_positions, first_failing_position, max_abs, mean_abs, max_rel, min_cosine,
  top1_agreement, top5_overlap, greedy: {tokens, agreement, first_divergence}), ``diagnosis``
  (code, line, first_position, layer, stage, evidence), ``layers`` (per layer ``after_attention`` /
  ``after_block``: max_abs, max_rel, failing_positions, first_failing_position; null without
  --per-layer) and ``steps``: one record per position (position, phase, call_start, call_len,
  input_token, max_abs, mean_abs, rel, cosine, top1, top5_overlap, reference_token, artifact_token,
  within_tolerance);
* ``comparisons``: Polygraphy backend-vs-backend results (see :mod:`mtx.parity.compare`);
* ``diagnosis``: every finding, ``{"backend": name or null, ...}``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from mtx.parity.core import BackendResult, ParityReport

RULE = "per position: max|artifact - reference| <= atol + rtol * max|reference|"
STAGES = ("after_attention", "after_block")


def _first(mask: np.ndarray) -> int | None:
    idx = np.flatnonzero(mask)
    return int(idx[0]) if idx.size else None


def _greedy(report: ParityReport, res: BackendResult) -> dict[str, Any]:
    """The tokens a greedy generation would emit: argmax at positions P-1 .. T-1."""
    first = report.schedule.prompt_len - 1
    ref = res.logits["reference_token"][first:].astype(np.int64)
    got = res.logits["artifact_token"][first:].astype(np.int64)
    diverge = _first(ref != got)
    return {"tokens": int(ref.size), "agreement": float((ref == got).mean()) if ref.size else 1.0,
            "first_divergence": None if diverge is None else {
                "position": first + diverge, "decode_step": diverge,
                "reference_token": int(ref[diverge]), "artifact_token": int(got[diverge])}}


def summary(report: ParityReport, res: BackendResult) -> dict[str, Any]:
    lg = res.logits
    return {
        "positions": int(res.within.size), "failing_positions": int((~res.within).sum()),
        "first_failing_position": _first(~res.within),
        "max_abs": float(lg["max_abs"].max()), "mean_abs": float(lg["mean_abs"].mean()),
        "max_rel": float(lg["rel"].max()), "min_cosine": float(lg["cosine"].min()),
        "top1_agreement": float(lg["top1"].mean()), "top5_overlap": float(lg["top5_overlap"].mean() / 5),
        "greedy": _greedy(report, res),
    }


def _layers_json(res: BackendResult) -> list[dict[str, Any]] | None:
    if res.layer_max_abs is None:
        return None
    out = []
    for layer in range(res.layer_max_abs.shape[0]):
        entry: dict[str, Any] = {"layer": layer}
        for s, stage in enumerate(STAGES):
            bad = ~res.layer_within[layer, s]
            entry[stage] = {"max_abs": float(res.layer_max_abs[layer, s].max()),
                            "max_rel": float(res.layer_rel[layer, s].max()),
                            "failing_positions": int(bad.sum()), "first_failing_position": _first(bad)}
        out.append(entry)
    return out


def _steps_json(report: ParityReport, res: BackendResult) -> list[dict[str, Any]]:
    lg, steps = res.logits, []
    for call in report.schedule.calls:
        for p in range(call.start, call.stop):
            steps.append({
                "position": p, "phase": call.phase, "call_start": call.start, "call_len": call.length,
                "input_token": int(report.input_tokens[p]), "max_abs": float(lg["max_abs"][p]),
                "mean_abs": float(lg["mean_abs"][p]), "rel": float(lg["rel"][p]), "cosine": float(lg["cosine"][p]),
                "top1": bool(lg["top1"][p]), "top5_overlap": int(lg["top5_overlap"][p]),
                "reference_token": int(lg["reference_token"][p]), "artifact_token": int(lg["artifact_token"][p]),
                "within_tolerance": bool(res.within[p])})
    return steps


def to_json(report: ParityReport) -> dict[str, Any]:
    m, sched, tol = report.manifest, report.schedule, report.tolerance
    backends: dict[str, Any] = {}
    findings: list[dict[str, Any]] = []
    for res in report.backends:
        if res.status != "ran":
            backends[res.name] = {"status": res.status, "reason": res.reason, "passed": None, "summary": None,
                                  "diagnosis": None, "layers": None, "steps": []}
            continue
        backends[res.name] = {"status": "ran", "reason": None, "passed": res.passed, "summary": summary(report, res),
                              "diagnosis": res.finding.to_json(), "layers": _layers_json(res),
                              "steps": _steps_json(report, res)}
        findings.append({"backend": res.name, **res.finding.to_json()})
    findings += [{"backend": None, **f.to_json()} for f in report.findings]
    return {
        "passed": report.passed, "exit_code": report.exit_code,
        "checkpoint": str(report.checkpoint), "export": str(report.out), "target": m.target, "dtype": m.dtype,
        "attention_op": m.attention_op, "moe_op": m.moe_op,
        "tolerance": {"atol": tol.atol, "rtol": tol.rtol, "source": tol.source, "rule": RULE},
        "run": {"window": sched.window, "effective_window": sched.effective_window, "capacity": sched.capacity,
                "chunk": sched.chunk, "prompt_len": sched.prompt_len, "steps": sched.steps,
                "positions": sched.positions, "seed": report.seed, "prompt": report.prompt,
                "calls": len(sched.calls),
                "prefill_chunks": [[c.start, c.length] for c in sched.calls if c.phase == "prefill"],
                "window_boundaries": sched.window_boundaries(), "buffer_wraps": sched.buffer_wraps(),
                "per_layer": report.per_layer},
        "notes": report.notes,
        "backends": backends,
        "comparisons": [c.to_json() for c in report.comparisons],
        "diagnosis": findings,
    }


# --------------------------------------------------------------------------------------------------
# Human output


def _segments(report: ParityReport) -> list[tuple[str, int, int]]:
    """(phase, start, stop) rows of the position table: each prefill chunk (grouped by window if there
    are many), then decoding in spans cut at window boundaries."""
    sched = report.schedule
    prefill = [c for c in sched.calls if c.phase == "prefill"]
    w = sched.effective_window
    rows: list[tuple[str, int, int]] = []
    if len(prefill) <= 12:
        rows += [("prefill", c.start, c.stop) for c in prefill]
    else:
        rows += [("prefill", s, min(s + w, sched.prompt_len)) for s in range(0, sched.prompt_len, w)]
    start = sched.prompt_len
    while start < sched.positions:
        stop = min((start // w + 1) * w, sched.positions)
        rows.append(("decode", start, stop))
        start = stop
    return rows


def _fmt(x: float) -> str:
    return f"{x:.1e}"


def _opt(x: int | None) -> str:
    return "-" if x is None else str(x)


def render(report: ParityReport, console: Any = None) -> None:
    """Print the report for humans (rich tables) on ``console`` (default: stdout)."""
    from rich.console import Console

    console = console or Console()
    _print_header(report, console)
    console.print(_summary_table(report))
    for res in report.ran:
        console.print(_positions_table(report, res))
        layers = _layers_json(res)
        if layers:
            console.print(_layers_table(res.name, layers))
    if report.comparisons:
        console.print(_comparisons_table(report))
    _print_verdict(report, console)


def _table(title: str) -> Any:
    from rich import box
    from rich.table import Table

    return Table(title=title, box=box.SIMPLE_HEAD, pad_edge=False)


def _print_header(report: ParityReport, console: Any) -> None:
    m, sched, tol = report.manifest, report.schedule, report.tolerance
    console.print(f"[bold]mtx parity[/bold] {report.checkpoint} vs {report.out} "
                  f"(target {m.target}, {m.dtype}, {m.attention_op}{', ' + m.moe_op if m.moe_op else ''})")
    source = "text" if report.prompt is not None else f"seed {report.seed}"
    console.print(f"  window {sched.window or 'none (full attention)'}, capacity {sched.capacity}, "
                  f"chunk {sched.chunk}, prompt {sched.prompt_len} tokens ({source}), "
                  f"{sched.steps} decode steps teacher-forced with the reference's greedy token = "
                  f"{sched.positions} positions")
    console.print(f"  tolerance: atol {tol.atol:g}, rtol {tol.rtol:g} ({tol.source}); {RULE}")
    for note in report.notes:
        console.print(f"  [yellow]note:[/yellow] {note}")


SUMMARY_ROWS = ("verdict", "failing positions", "first failing", "max abs", "mean abs", "max rel ‖a−r‖/‖r‖",
                "1 − min cosine", "top-1 agreement", "top-5 overlap", "greedy tokens agreeing", "first divergence")


def _summary_cells(report: ParityReport, res: BackendResult) -> list[str]:
    """One column of the summary table (SUMMARY_ROWS in order)."""
    if res.status != "ran":
        return ["[yellow]skipped[/yellow]", res.reason or ""] + [""] * (len(SUMMARY_ROWS) - 2)
    s = summary(report, res)
    g, div = s["greedy"], s["greedy"]["first_divergence"]
    return ["[green]PASS[/green]" if res.passed else "[red]FAIL[/red]",
            f"{s['failing_positions']}/{s['positions']}", _opt(s["first_failing_position"]), _fmt(s["max_abs"]),
            _fmt(s["mean_abs"]), _fmt(s["max_rel"]), _fmt(1 - s["min_cosine"]), f"{s['top1_agreement']:.1%}",
            f"{s['top5_overlap']:.1%}", f"{round(g['agreement'] * g['tokens'])}/{g['tokens']}",
            "-" if div is None else f"position {div['position']}: {div['artifact_token']} (reference "
                                    f"{div['reference_token']})"]


def _summary_table(report: ParityReport) -> Any:
    t = _table("summary: logits at every position")
    t.add_column("")
    for res in report.backends:
        t.add_column(res.name, overflow="fold")
    columns = [_summary_cells(report, res) for res in report.backends]
    for i, name in enumerate(SUMMARY_ROWS):
        t.add_row(name, *(col[i] for col in columns))
    return t


def _positions_table(report: ParityReport, res: BackendResult) -> Any:
    lg = res.logits
    t = _table(f"{res.name}: logits error by position (window boundaries at multiples of "
               f"{report.schedule.effective_window})")
    for col in ("pos", "phase", "max abs", "mean abs", "max rel", "1−cos", "top1", "top5", "bad"):
        t.add_column(col, justify="left" if col in ("pos", "phase") else "right", no_wrap=True)
    for phase, a, b in _segments(report):
        sl = slice(a, b)
        failing = int((~res.within[sl]).sum())
        t.add_row(f"{a}-{b - 1}" if b - a > 1 else str(a), phase, _fmt(lg["max_abs"][sl].max()),
                  _fmt(lg["mean_abs"][sl].mean()), _fmt(lg["rel"][sl].max()), _fmt(1 - lg["cosine"][sl].min()),
                  f"{lg['top1'][sl].mean():.0%}", f"{lg['top5_overlap'][sl].mean() / 5:.0%}",
                  f"[red]{failing}[/red]" if failing else "0")
    return t


def _layers_table(name: str, layers: list[dict[str, Any]]) -> Any:
    t = _table(f"{name}: residual stream per layer (same tolerance rule)")
    for col in ("layer", "attn max abs", "attn rel", "attn failing (first)", "block max abs", "block rel",
                "block failing (first)"):
        t.add_column(col, justify="right")
    for entry in layers:
        cells = [str(entry["layer"])]
        for stage in STAGES:
            e = entry[stage]
            bad = e["failing_positions"]
            cells += [_fmt(e["max_abs"]), _fmt(e["max_rel"]),
                      f"[red]{bad} ({e['first_failing_position']})[/red]" if bad else "0"]
        t.add_row(*cells)
    return t


def _comparisons_table(report: ParityReport) -> Any:
    t = _table("backend vs backend, per call (Polygraphy Comparator.compare_accuracy, SimpleCompareFunc elemwise)")
    for col in ("pair", "atol (2× tolerance)", "calls failed", "first failed call", "max |a-b|", "verdict"):
        t.add_column(col)
    for c in report.comparisons:
        j = c.to_json()
        t.add_row(f"{c.first} vs {c.second}", f"{j['atol']:.2g}", f"{j['calls_failed']}/{j['calls_compared']}",
                  _opt(j["first_failed_call_start"]), _fmt(j["max_absdiff"]),
                  "[green]PASS[/green]" if c.passed else "[red]FAIL[/red]")
    return t


def _print_verdict(report: ParityReport, console: Any) -> None:
    for res in report.ran:
        style = "green" if res.finding.code == "match" else "red" if not res.passed else "yellow"
        console.print(f"[{style}]diagnosis[/{style}] {res.name}: {res.finding.line}")
    for f in report.findings:
        console.print(f"[red]diagnosis[/red] {f.line}")
    skipped = "".join(f"; {r.name} skipped: {r.reason}" for r in report.backends if r.status != "ran")
    if report.passed:
        console.print(f"[bold green]PASS[/bold green]: {', '.join(r.name for r in report.ran)} within tolerance at all "
                      f"{report.schedule.positions} positions{skipped}")
    else:
        failing = [r.name for r in report.ran if not r.passed] + \
                  [f"{c.first} vs {c.second}" for c in report.comparisons if not c.passed]
        console.print(f"[bold red]FAIL[/bold red]: {', '.join(failing)} outside tolerance{skipped}")


# --------------------------------------------------------------------------------------------------
# Plot


def write_plot(report: ParityReport, path: str | Path) -> Path:
    """Error vs position (log scale), window boundaries and buffer wraps marked; written atomically.

    With per-layer values, a second panel shows each layer's relative error after the block.
    The format follows the file suffix (png by default).
    """
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    path = Path(path)
    sched, tol = report.schedule, report.tolerance
    with_layers = [r for r in report.ran if r.layer_rel is not None]
    fig, axes = plt.subplots(2 if with_layers else 1, 1, figsize=(11, 7.5 if with_layers else 4.5), squeeze=False,
                             sharex=True)
    ax = axes[0, 0]
    pos = np.arange(sched.positions)
    floor = 1e-12
    for res in report.ran:
        err = np.maximum(res.logits["max_abs"], floor)
        line, = ax.plot(pos, err, lw=1.2, label=f"{res.name} max |logits error|")
        bad = ~res.within
        ax.scatter(pos[bad], err[bad], s=14, color=line.get_color(), marker="x")
    if report.ran:
        limit = tol.limit(report.ran[0].logits["ref_max"])
        ax.plot(pos, np.maximum(limit, floor), "k--", lw=0.8, label="tolerance")
    ax.set_yscale("log")
    ax.set_ylabel("max |artifact − reference|")
    ax.set_title(f"mtx parity: {report.out.name} ({report.manifest.target}, {report.manifest.dtype}) — "
                 + "; ".join(f"{r.name}: {r.finding.code}" for r in report.ran))
    for axis in axes[:, 0]:
        axis.axvspan(-0.5, sched.prompt_len - 0.5, color="0.92", zorder=0)
        for i, b in enumerate(sched.window_boundaries()):
            axis.axvline(b - 0.5, color="tab:red", ls="--", lw=0.8, label="window boundary k·W" if i == 0 else None)
        if sched.capacity != sched.effective_window or not sched.window:
            for i, b in enumerate(sched.buffer_wraps()):
                axis.axvline(b - 0.5, color="tab:purple", ls=":", lw=0.8, label="buffer wrap k·C" if i == 0 else None)
    ax.legend(fontsize=7, loc="upper left")
    if with_layers:
        res = with_layers[0]
        ax2 = axes[1, 0]
        for layer in range(res.layer_rel.shape[0]):
            line, = ax2.plot(pos, np.maximum(res.layer_rel[layer, 1], floor), lw=1, label=f"layer {layer} block")
            ax2.plot(pos, np.maximum(res.layer_rel[layer, 0], floor), lw=0.8, ls="--", color=line.get_color())
        ax2.set_yscale("log")
        ax2.set_ylabel(f"{res.name}: ‖a − r‖/‖r‖ per layer\n(dashed: after attention)")
        ax2.legend(fontsize=7, loc="upper left", ncol=4)
    axes[-1, 0].set_xlabel("position (shaded: prefill)")
    fig.tight_layout()
    fmt = path.suffix.lstrip(".").lower() or "png"
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format=fmt, dpi=110)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp made it 0600; the plot is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    finally:
        plt.close(fig)
    return path

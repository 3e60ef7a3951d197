"""The ``mtx`` command line: a thin layer of click commands over the Python API.

Bad input (:class:`mtx.errors.MtxError`) prints one line ``mtx: error: ...`` on stderr and exits
with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from mtx import __version__
from mtx.errors import MtxError

CKPT_HELP = ("Checkpoint folder (config.json or params.json with *.safetensors), or builtin:mistral / "
             "builtin:mixtral. Default: the built-in Mistral.")


class _Group(click.Group):
    """Turns MtxError into one line and exit code 2, unless --debug."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except MtxError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"mtx: error: {e}", err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("mtx: interrupted", err=True)
            sys.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="mtx")
@click.option("--debug", is_flag=True, help="Show full tracebacks for errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """mtx: Mistral and Mixtral from PyTorch to ONNX Runtime and TensorRT.

    \b
    Typical flow:
      mtx inspect CKPT              check a checkpoint and show its config
      mtx export CKPT -o OUT        trace to ONNX (+ TensorRT engine) with the mtx custom ops
      mtx parity CKPT OUT           compare the artifact against the PyTorch reference
      mtx generate OUT --prompt ..  generate text from the artifact

    CKPT may be omitted (or given as builtin:mistral / builtin:mixtral) to use the built-in model.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2, sort_keys=False))


@main.command()
@click.argument("ckpt", required=False)
@click.option("--verify", is_flag=True, help="Also read every tensor and check it holds finite values.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object instead of a table.")
def inspect(ckpt: str | None, verify: bool, as_json: bool) -> None:
    """Check a checkpoint and show its config.

    Reads config.json (Hugging Face) or params.json (mistral-inference) and every safetensors header,
    and checks that each tensor the model needs is present with the shape the config implies.
    CKPT defaults to the built-in Mistral.
    """
    from mtx.assets import resolve_checkpoint
    from mtx.models.checkpoint import Checkpoint

    ck = Checkpoint(resolve_checkpoint(ckpt))
    if verify:
        ck.verify_data()
    cfg = ck.config
    params = sum(int(_numel(ck.shapes[n])) for n in ck.names())
    info = {
        "checkpoint": str(ck.root),
        "format": cfg.source_format,
        "dtype": str(ck.dtype).removeprefix("torch."),
        "parameters": params,
        "files": sorted({str(r.file.name) for s in ck.sources.values() for r in s.refs}),
        "verified_data": verify,
        "config": cfg.to_dict(),
    }
    if as_json:
        emit_json(info)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"{ck.root}", show_header=False)
    t.add_row("format", cfg.source_format)
    t.add_row("dtype", info["dtype"])
    t.add_row("parameters", f"{params:,}")
    t.add_row("files", ", ".join(info["files"]))
    for k, v in cfg.to_dict().items():
        t.add_row(k, str(v))
    Console().print(t)
    click.echo("ok: every tensor present with the expected shape" + (" and finite data" if verify else ""))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def run() -> None:  # pragma: no cover - console entry for `python -m mtx`
    main(prog_name="mtx")


if __name__ == "__main__":  # pragma: no cover
    run()

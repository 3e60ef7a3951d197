"""The ``mtx`` command line: a thin layer of click commands over the Python API.

Bad input (:class:`mtx.errors.MtxError`) prints one line ``mtx: error: ...`` on stderr and exits
with code 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import json
import re
import signal
import sys
from pathlib import Path
from collections.abc import Callable
from typing import Any

import click

from mtx import __version__
from mtx.errors import MtxError, UsageError
from mtx.names import BACKENDS, DTYPES, TARGETS

class Terminated(BaseException):
    """SIGTERM arrived: unwinds like KeyboardInterrupt, so every cleanup runs."""


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Terminated()


class _OneLineOptions(click.Command):
    """Bad option values become one ``mtx: error:`` line (exit 2) instead of click's usage block."""

    def make_context(self, info_name: str | None, args: list[str], parent: click.Context | None = None,
                     **extra: Any) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise UsageError(e.format_message().replace("\n", " ")) from None


class _Group(click.Group):
    """Turns MtxError into one line and exit code 2, unless --debug. Subcommands parse options with
    :class:`_OneLineOptions`."""

    command_class = _OneLineOptions

    def invoke(self, ctx: click.Context) -> Any:
        signal.signal(signal.SIGTERM, _terminate)  # cleans up like Ctrl-C (partial exports are removed)
        try:
            return super().invoke(ctx)
        except MtxError as e:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"mtx: error: {_in_flags(str(e), e.params, self.get_command(ctx, ctx.invoked_subcommand or ''))}",
                       err=True)
            sys.exit(e.exit_code)
        except KeyboardInterrupt:
            click.echo("mtx: interrupted", err=True)
            sys.exit(130)
        except Terminated:
            click.echo("mtx: terminated (SIGTERM)", err=True)
            sys.exit(143)


def _in_flags(message: str, params: tuple[str, ...], command: click.Command | None) -> str:
    """``message`` with each Python parameter name in ``params`` (first mention) written as the
    command's flag (``cache_capacity`` -> ``--cache-capacity``)."""
    flags = {p.name: max(p.opts, key=len) for p in (command.params if command else [])
             if isinstance(p, click.Option)}
    for name in params:
        if name in flags:
            message = re.sub(rf"(?<![\w-]){re.escape(name)}(?![\w-])", flags[name], message, count=1)
    return message


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


def json_option(help: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--json`` (parameter ``as_json``): one JSON object on stdout instead of tables or text."""
    return click.option("--json", "as_json", is_flag=True, help=help)


def engine_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """``--backend --threads --device --verify --spin``: which engine runs an export, and where."""
    for option in reversed([
        click.option("--backend", type=click.Choice(BACKENDS), default=None,
                     help="Engine (default: the export's target; torch: the PyTorch reference of its checkpoint)."),
        click.option("--threads", type=int, default=None, help="CPU threads for the engine."),
        click.option("--device", default=None,
                     help="cpu (default) or cuda (onnxruntime-gpu, or torch with the Triton kernels)."),
        click.option("--verify/--no-verify", default=True, show_default=True,
                     help="Check the export's files against the sha256 in mtx.json before loading (weights once "
                          "per file state, remembered in ~/.cache/mtx); the graph is always checked against "
                          "mtx.json."),
        click.option("--spin/--no-spin", default=False, show_default=True,
                     help="ONNX Runtime: let intra-op threads spin-wait for work (session.intra_op.allow_spinning). "
                          "Off, they sleep and give a shared core back (measured: README, Spinning)."),
    ]):
        command = option(command)
    return command


@main.command()
@click.argument("ckpt", required=False)
@click.option("--verify", is_flag=True, help="Also read every tensor and check it holds finite values.")
@json_option("Print a JSON object instead of a table.")
def inspect(ckpt: str | None, verify: bool, as_json: bool) -> None:
    """Check a checkpoint and show its config.

    Reads config.json (Hugging Face) or params.json (mistral-inference) and every safetensors header,
    checks that each tensor the model needs is present with the shape the config implies, and loads
    the tokenizer files (tokenizer_mode: which kind an export would carry), the chat template and
    generation_config.json as export does.
    CKPT defaults to the built-in Mistral.
    """
    from mtx.assets import resolve_checkpoint
    from mtx.models.checkpoint import Checkpoint

    from mtx.tokenizer import check_side_files

    ck = Checkpoint(resolve_checkpoint(ckpt))
    if verify:
        ck.verify_data()
    cfg = ck.config
    # the tokenizer, chat template and generation config, as export checks them
    tokenizer = check_side_files(ck.root, cfg.eos_token_ids)
    params = sum(int(_numel(ck.shapes[n])) for n in ck.names())
    info = {
        "checkpoint": str(ck.root),
        "format": cfg.source_format,
        "dtype": str(ck.dtype).removeprefix("torch."),
        "parameters": params,
        "files": sorted({str(r.file.name) for s in ck.sources.values() for r in s.refs}),
        "verified_data": verify,
        "tokenizer_mode": tokenizer,
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
    t.add_row("tokenizer_mode", tokenizer)
    for k, v in cfg.to_dict().items():
        t.add_row(k, str(v))
    Console().print(t)
    click.echo("ok: every tensor present with the expected shape" + (" and finite data" if verify else ""))


class _RichProgress:
    """mtx.exporter.progress.Progress on stderr with rich (silent when stderr is not a terminal)."""

    def __init__(self) -> None:
        from rich.console import Console
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(stderr=True)
        self.bar = Progress(TextColumn("{task.description:<10}"), BarColumn(), DownloadColumn(), TimeElapsedColumn(),
                            console=self.console, transient=True, disable=not self.console.is_terminal)

    def __enter__(self) -> _RichProgress:
        self.bar.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.stop()

    def task(self, description: str, total: int):
        task = self.bar.add_task(description, total=max(total, 1))
        return lambda n: self.bar.advance(task, n)

    def stage(self, description: str) -> None:
        if self.console.is_terminal:
            self.bar.console.log(description)


@main.command()
@click.argument("ckpt", required=False)
@click.option("-o", "--out", "out", default=Path("mtx-out"), show_default=True, type=click.Path(path_type=Path),
              help="Output folder (created; replaced only with --force).")
@click.option("--target", type=click.Choice(TARGETS), default="onnxruntime",
              show_default=True,
              help="onnxruntime: attention and MoE lowered to ONNX Runtime contrib ops (GroupQueryAttention, MoE). "
                   "onnx: portable mtx custom ops with standard-op function bodies. "
                   "tensorrt: the mtx ops for the TensorRT plugins; builds the engine when TensorRT and the "
                   "plugins are installed.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True,
              help="Model dtype T. A checkpoint file the graph reads whole, as stored in T, is referenced, "
                   "not converted.")
@click.option("--cache-capacity", type=int, default=None,
              help="KV buffer slots C per layer (>= the sliding window). Default: the window, or "
                   "max_position_embeddings for full attention. Per-layer windows (Ministral): the "
                   "context C of the full-attention layers (default max_position_embeddings); sliding "
                   "layers hold their window.")
@click.option("--max-batch", type=int, default=8, show_default=True,
              help="Largest batch the runtime will use: the TensorRT engine profile, and the limit mtx.runtime "
                   "enforces for every target (recorded in mtx.json).")
@click.option("--max-position", type=int, default=None,
              help="onnxruntime target: positions must stay below this (rows of the rotary tables). "
                   "Default: max_position_embeddings, or the capacity for full attention.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists (an earlier export or any other folder).")
@click.option("--allow-nonfinite", is_flag=True,
              help="Export weights that hold NaN or Inf (refused by default, naming the tensor).")
@click.option("--quantize", type=click.Choice(["int8", "int4"]), default=None,
              help="Weight-only quantisation of the projections, experts and embedding table, round to nearest "
                   "per block (docs/ops.md §7): onnxruntime target MatMulNBits / QMoE / GatherBlockQuantized, "
                   "onnx and tensorrt blocked DequantizeLinear. Default: float weights.")
@click.option("--block-size", type=click.Choice(["32", "64", "128"]), default="128", show_default=True,
              help="Weights per quantisation block along the input dimension (one scale and zero point each). "
                   "Smaller blocks are more accurate and read more bytes per token.")
@click.option("--quantize-lm-head/--no-quantize-lm-head", default=True, show_default=True,
              help="With --quantize: quantise the output projection too (a tied embedding table is quantised "
                   "once, in --lm-head-bits, only when the embedding is quantised too).")
@click.option("--quantize-embedding/--no-quantize-embedding", default=True, show_default=True,
              help="With --quantize: quantise the embedding table too (--embedding-bits), gathered from its codes.")
@click.option("--embedding-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="With --quantize: code width of the embedding table (a tied table takes --lm-head-bits). "
                   "4 halves its bytes and costs top-1 agreement (README).")
@click.option("--lm-head-bits", type=click.Choice(["8", "4"]), default="8", show_default=True,
              help="With --quantize: code width of the output projection (4 reads fewer bytes per token, "
                   "costs more quality).")
@click.option("--quant-scheme", type=click.Choice(["asymmetric", "symmetric"]), default="asymmetric",
              show_default=True, help="With --quantize: a zero point per block, or the fixed one 2^(bits-1).")
@click.option("--accuracy-level", type=click.Choice(["0", "4"]), default="4", show_default=True,
              help="onnxruntime target with --quantize: 4 lets ONNX Runtime quantise activations to int8 "
                   "(fastest on CPU); 0 keeps them float, so the graph equals the fake-quant reference.")
@click.option("--tokenizer-mode", type=click.Choice(["auto", "hf", "mistral"]), default="auto", show_default=True,
              help="The tokenizer the export carries. mistral: Mistral's own file (tekken.json or "
                   "tokenizer.model.v<N>), read with mistral_common, which also encodes chat prompts. hf: "
                   "tokenizer.json and its side files (chat template). auto: mistral for a mistral-format "
                   "checkpoint (params.json) or one whose only tokenizer is Mistral's, else hf.")
@json_option("Print the manifest (mtx.json) as JSON instead of a summary.")
def export(ckpt: str | None, out: Path, target: str, dtype: str, cache_capacity: int | None, max_batch: int,
           max_position: int | None, force: bool, allow_nonfinite: bool, quantize: str | None, block_size: str,
           quantize_lm_head: bool, quantize_embedding: bool, embedding_bits: str, lm_head_bits: str, quant_scheme: str,
           accuracy_level: str, tokenizer_mode: str, as_json: bool) -> None:
    """Export a checkpoint to ONNX: OUT/model.onnx, weights, mtx.json, tokenizer files.

    Each attention block becomes one SlidingWindowGQA node and each MoE block one MoE node (domain
    mtx), lowered to ONNX Runtime contrib ops for --target onnxruntime. The folder is written next
    to OUT and moved into place when complete. CKPT defaults to the built-in Mistral.
    """
    from mtx.exporter.options import ExportOptions, check_out

    options = ExportOptions(target=target, dtype=dtype, cache_capacity=cache_capacity, max_batch=max_batch,
                            max_position=max_position, force=force, allow_nonfinite=allow_nonfinite,
                            quantize=quantize, block_size=int(block_size), quantize_lm_head=quantize_lm_head,
                            quantize_embedding=quantize_embedding, embedding_bits=int(embedding_bits),
                            lm_head_bits=int(lm_head_bits),
                            quant_scheme=quant_scheme, accuracy_level=int(accuracy_level),
                            tokenizer_mode=tokenizer_mode)
    options.validate()  # cheap checks first: bad options fail before torch is imported
    check_out(out, force)
    from mtx.exporter.core import export as run_export

    with _RichProgress() as progress:
        result = run_export(ckpt, out, options, progress)
    m = result.manifest
    if as_json:
        emit_json({"out": str(result.out), **m.to_dict()})
        return
    click.echo(f"exported {m.checkpoint['path']} -> {result.out}")
    if m.window is not None and m.capacity is not None:
        kv = f"capacity {m.capacity}, window {m.window or 'none'}"
    else:
        kv = "per-layer windows " + ", ".join(f"{x.window or 'none'}/C {x.capacity}" for x in m.layers)
    click.echo(f"  target {m.target}, dtype {m.dtype}, {kv}, kv layout {m.kv.layout}")
    click.echo(f"  attention: {m.attention_op}" + (f" (local_window_size {m.local_window_size})"
                                                   if m.local_window_size is not None else ""))
    if m.moe_op:
        click.echo(f"  moe: {m.moe_op}")
    if m.quantization is not None:
        qz, tied = m.quantization, m.config.get("tie_word_embeddings", False)
        click.echo(f"  quantized: {len(qz.tensors)} weights to {qz.bits} bits, blocks of {qz.block_size}, "
                   f"{qz.scheme}" + ("" if qz.accuracy_level is None else f", accuracy_level {qz.accuracy_level}")
                   + "".join(f", lm_head {t.bits} bits" for t in qz.tensors if t.weight == "output.weight")
                   + "".join(f", embedding {t.bits} bits" + (" (also the tied lm_head)" if qz.lm_head and tied else "")
                             for t in qz.tensors if t.weight == "embed.weight"))
    w = m.weights
    click.echo(f"  weights: {w['referenced_bytes']:,} bytes referenced in checkpoint files, "
               f"{w['written_bytes']:,} bytes written")
    for note in result.notes:
        click.echo(f"  {note}")
    from mtx.manifest import MANIFEST

    click.echo(f"  files: {', '.join(f.path for f in m.files)}, {MANIFEST}")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise UsageError(f"--ids: expected comma-separated integers such as 1,2,3, got {text!r}") from None


@main.command()
@click.argument("out", required=False)
@click.option("--prompt", help="Prompt text (tokenized with OUT's tokenizer: tokenizer.json, or Mistral's file).")
@click.option("--ids", help="Prompt as comma-separated token ids, e.g. 1,2,3.")
@click.option("--max-new-tokens", default=64, show_default=True, help="Tokens to generate at most.")
@click.option("--temperature", default=0.0, show_default=True, help="0 = greedy; > 0 samples.")
@click.option("--top-k", default=0, show_default=True, help="Sample from the k most likely tokens (0 = all).")
@click.option("--top-p", default=1.0, show_default=True, help="Nucleus sampling mass (1 = off).")
@click.option("--repetition-penalty", default=1.0, show_default=True, help="HF-style penalty on seen tokens.")
@click.option("--seed", type=int, default=None, help="Seed for sampling (reproducible output).")
@click.option("--stop", multiple=True,
              help="Stop when this text appears; the text ends before it (repeatable).")
@click.option("--speculative-ngram", type=int, default=None, metavar="K",
              help="Prompt-lookup speculative decoding: verify up to K tokens drafted from the text's own "
                   "n-grams in one call (the same tokens; faster where the output repeats the input).")
@engine_options
@json_option('Print {"ids": [...], "text": ..., "speculative": {...}} instead of streaming.')
def generate(out: str | None, prompt: str | None, ids: str | None, max_new_tokens: int, temperature: float,
             top_k: int, top_p: float, repetition_penalty: float, seed: int | None, stop: tuple[str, ...],
             speculative_ngram: int | None, backend: str | None, threads: int | None, device: str | None,
             verify: bool, spin: bool, as_json: bool) -> None:
    """Generate from an export folder OUT (or a checkpoint, with the PyTorch reference).

    Streams text as it is produced. The rolling KV buffer keeps memory fixed however long the
    generation runs. OUT defaults to the built-in Mistral checkpoint (torch backend).
    """
    import mtx.runtime

    if (prompt is None) == (ids is None):
        raise UsageError("give exactly one of --prompt TEXT or --ids 1,2,3")
    gen = mtx.runtime.load(out, backend, threads=threads, device=device, verify=verify, spin=spin)
    prompt_value: str | list[int] = prompt if prompt is not None else _parse_ids(ids or "")
    has_text = gen.tokenizer is not None
    kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty,
              seed=seed, stop=list(stop) or None, want_text=has_text)
    if speculative_ngram is not None:
        kw["speculative"] = {"method": "ngram", "num_tokens": speculative_ngram}
    produced: list[int] = []
    parts: list[str] = []  # the core's text: complete characters, ending before the first stop string
    stats = None
    for _, o, stats in gen.stream_outputs_with_stats([prompt_value], max_new_tokens, **kw):
        if o.token is not None:
            produced.append(o.token)
        parts.append(o.text)
        if as_json:
            continue
        if not has_text and o.token is not None:
            click.echo(f"{o.token} ", nl=False)
        elif o.text:
            click.echo(o.text, nl=False)
    if as_json:
        spec = None if speculative_ngram is None or stats is None else {
            "verifications": stats.verifications, "drafted": stats.drafted, "accepted": stats.accepted}
        emit_json({"ids": produced, "text": "".join(parts) if has_text else None, "speculative": spec})
    else:
        click.echo()


@main.command()
@click.argument("out", required=False)
@click.option("--batch", default=1, show_default=True, help="Rows decoded together.")
@click.option("--prompt-len", default=128, show_default=True, help="Prompt tokens per row (random ids).")
@click.option("--new-tokens", default=256, show_default=True, help="Tokens generated per row.")
@engine_options
@click.option("--seed", default=0, show_default=True, help="Seed of the random prompt ids.")
@json_option("Print one JSON object.")
def bench(out: str | None, batch: int, prompt_len: int, new_tokens: int, backend: str | None,
          threads: int | None, device: str | None, verify: bool, spin: bool, seed: int, as_json: bool) -> None:
    """Measure prefill and decode tokens/s, time to first token, peak RSS, memory (anonymous resident bytes
    plus mapped weight files, sampled while it runs) and KV buffer bytes.

    Also reports the median decode-step latency at positions W, 2W, ... 20W, which stays flat: the
    rolling buffer keeps attention cost and memory fixed however long generation runs.
    """
    import mtx.runtime
    from mtx.runtime.bench import run_bench

    gen = mtx.runtime.load(out, backend, threads=threads, device=device, verify=verify, spin=spin)
    res = run_bench(gen, batch=batch, prompt_len=prompt_len, new_tokens=new_tokens, seed=seed)
    if as_json:
        emit_json(res)
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"mtx bench ({res['backend']})", show_header=False)
    for k, v in res.items():
        t.add_row(k, str(v))
    Console().print(t)


def _parse_backends(text: str | None) -> tuple[str, ...] | None:
    if text is None:
        return None
    return tuple(t.strip() for t in text.split(",") if t.strip())


@main.command()
@click.argument("ckpt")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--backends", default=None, metavar="LIST",
              help="Comma-separated artifact backends: onnxruntime, tensorrt, torch (the PyTorch model in the "
                   "export's dtype). Default: onnxruntime, plus tensorrt when OUT has an engine (skipped, with the "
                   "reason, where TensorRT cannot run). Two or more are also compared with each other (Polygraphy).")
@click.option("--prompt", default=None, help="Prefill text, tokenized with OUT's tokenizer.")
@click.option("--prompt-len", type=int, default=None,
              help="Prefill this many random token ids (from --seed). Default: 2·C + 1 (past two buffer wraps), "
                   "or half the capacity for full attention.")
@click.option("--steps", type=int, default=None,
              help="Decode steps after the prefill, one token each, teacher-forced with the reference's greedy "
                   "token. Default: 3·C + chunk (past three buffer wraps); fewer than 3·C is reported as a note.")
@click.option("--chunk", type=int, default=None,
              help="Prefill chunk length. Default: about W/3, chosen not to divide W, so chunk boundaries cross "
                   "window boundaries.")
@click.option("--per-layer", is_flag=True,
              help="Also compare every layer's residual stream after attention and after the block, read from the "
                   "artifact itself (mtx.json layer_outputs), to show where the error starts.")
@click.option("--atol", type=float, default=None,
              help="Absolute tolerance. Default by dtype: float32 1e-4, float16 1e-2, bfloat16 8e-2.")
@click.option("--rtol", type=float, default=None,
              help="Relative tolerance, times the largest |reference logit| of the position. Default by dtype: "
                   "float32 0, float16 1e-2, bfloat16 8e-2.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random prompt ids.")
@click.option("--quality", is_flag=True,
              help="Instead of exact logits: perplexity of the export and of the float32 model (no fake quant) "
                   "on a text, and their top-1 agreement (for quantised exports). Exit code 0.")
@click.option("--text", "text_file", type=click.Path(path_type=Path), default=None,
              help="With --quality: the text file to score. Default: mtx's own sources, held out from the built-in "
                   "models' training data (Python's standard library).")
@click.option("--max-tokens", type=int, default=2048, show_default=True, help="With --quality: tokens scored.")
@json_option("Print one JSON object (per-step records, summary, diagnosis) instead of tables.")
@click.option("--plot", type=click.Path(path_type=Path), default=None, metavar="PNG",
              help="Write a plot of the error vs position with window boundaries marked (format from the suffix).")
def parity(ckpt: str, out: Path, backends: str | None, prompt: str | None, prompt_len: int | None,
           steps: int | None, chunk: int | None, per_layer: bool, atol: float | None, rtol: float | None, seed: int,
           quality: bool, text_file: Path | None, max_tokens: int, as_json: bool, plot: Path | None) -> None:
    """Check an export OUT against the PyTorch reference built from CKPT, position by position.

    Runs a chunked prefill and then single-token decoding past several wraps of the rolling KV buffer
    through the artifact's runtime backends and the float32 reference, on the same tokens, and reports
    per position the max/mean abs and relative error of the logits, cosine similarity, top-1 and top-5
    agreement, plus greedy-token agreement and a diagnosis of where errors start and why.
    Exit code 0: within tolerance; 1: outside it; 2: bad input. CKPT may be builtin:mistral / builtin:mixtral.
    """
    import importlib.util

    from mtx.parity.options import ParityOptions

    if quality:
        from mtx.parity.quality import run_quality

        q = run_quality(ckpt, out, text_file, max_tokens)
        if as_json:
            emit_json(q.to_dict())
        else:
            click.echo(f"quality on {q.text}: {q.tokens} tokens")
            click.echo(f"  perplexity: float32 reference {q.reference_perplexity:.4f}, export {q.export_perplexity:.4f} "
                       f"({(q.perplexity_ratio - 1) * 100:+.2f}%)")
            click.echo(f"  top-1 agreement with the reference: {q.top1_agreement:.2%}")
        return
    if text_file is not None:
        raise UsageError("--text applies to --quality only")

    options = ParityOptions(backends=_parse_backends(backends), prompt=prompt, prompt_len=prompt_len, steps=steps,
                            chunk=chunk, per_layer=per_layer, atol=atol, rtol=rtol, seed=seed)
    options.validate()
    if plot is not None and (plot.is_dir() or not plot.parent.is_dir()):
        raise UsageError(f"--plot {plot}: expected a file path in an existing folder")
    if plot is not None and importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib, which is not installed (pip install matplotlib)")
    from mtx.parity import report as parity_report
    from mtx.parity import run_parity

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(stderr=True)
    bar = Progress(TextColumn("parity calls"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   console=console, transient=True, disable=not console.is_terminal)
    with bar:
        task = bar.add_task("calls", total=None)
        result = run_parity(ckpt, out, options, progress=lambda done, total: bar.update(task, completed=done,
                                                                                        total=total))
    if plot is not None:
        parity_report.write_plot(result, plot)
    if as_json:
        emit_json(parity_report.to_json(result))
    else:
        parity_report.render(result)
        if plot is not None:
            click.echo(f"plot: {plot}")
    sys.exit(result.exit_code)


@main.command()
@click.argument("out", required=False)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, help="TCP port.")
@click.option("--max-batch", type=int, default=None,
              help="KV rows of the engine: requests decoded together (default: the export's max_batch).")
@click.option("--max-queue", type=int, default=64, show_default=True,
              help="Requests that may wait for a free row; beyond it requests get HTTP 429 at once.")
@click.option("--token-budget", type=int, default=None,
              help="Tokens one engine step may feed: one per decoding request, the rest to chunks of new "
                   "prompts (default 128).")
@click.option("--decode-deferral", type=int, default=None, metavar="TOKENS",
              help="Prompt tokens that may be prefilled while running streams wait, so a burst of arrivals "
                   "stalls each stream once (default 4096; 0: decode every step).")
@click.option("--prefill-chunk", type=int, default=None, metavar="TOKENS",
              help="Prompts are fed in chunks ending at multiples of this (the prefix cache's block; at most "
                   "the window for the cache to be used; default 128).")
@click.option("--prefix-cache-bytes", type=int, default=None, metavar="BYTES",
              help="Memory for cached prompt blocks, reused by later requests that start with the same tokens "
                   "(LRU; 0: off; default 536870912, 512 MiB, where the prefill chunk fits the window).")
@click.option("--model-name", default=None, help="Model id clients send (default: the folder name).")
@click.option("--max-request-bytes", type=int, default=None,
              help="Largest request body; larger ones get HTTP 413 (default 2097152, 2 MiB).")
@click.option("--body-timeout", type=float, default=None,
              help="Seconds a client may take to send a request body; then HTTP 408 (default 30).")
@click.option("--ray", "use_ray", is_flag=True, help="Serve on Ray Serve instead: one engine per replica.")
@click.option("--replicas", type=int, default=1, show_default=True, help="With --ray: number of replicas.")
@click.option("--autoscaling", default=None, metavar="JSON",
              help='With --ray: Ray Serve autoscaling_config, passed as given (e.g. \'{"min_replicas": 1, '
                   '"max_replicas": 4}\'); replaces --replicas.')
@engine_options
def serve(out: str | None, host: str, port: int, max_batch: int | None, max_queue: int, token_budget: int | None,
          decode_deferral: int | None, prefill_chunk: int | None, prefix_cache_bytes: int | None,
          model_name: str | None, max_request_bytes: int | None, body_timeout: float | None, use_ray: bool,
          replicas: int, autoscaling: str | None, backend: str | None, threads: int | None, device: str | None,
          verify: bool, spin: bool) -> None:
    """Serve an export OUT over an OpenAI-compatible HTTP API (continuous batching).

    \b
    Routes: POST /v1/completions, POST /v1/chat/completions (stream: true for
    server-sent events), GET /v1/models, /health, /ready, /metrics (Prometheus).
    Requests join and leave the engine's batch between decode steps; its KV memory is
    fixed at max_batch x C slots (rolling buffers, no paged cache). SIGTERM drains:
    new requests get 503, running ones finish, then the server exits.
    OUT defaults to the built-in Mistral checkpoint (torch backend).
    """
    from mtx.serving.engine import DEFAULT_DEFERRED_TOKENS, DEFAULT_TOKEN_BUDGET
    from mtx.serving.protocol import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES
    from mtx.serving.server import ServeOptions

    if not 0 <= port <= 65535:
        raise UsageError(f"--port must be 0..65535, got {port}")
    if replicas < 1:
        raise UsageError(f"--replicas must be >= 1, got {replicas}")
    if decode_deferral is not None and decode_deferral < 0:
        raise UsageError(f"--decode-deferral must be >= 0, got {decode_deferral}")
    if max_request_bytes is not None and max_request_bytes < 1:
        raise UsageError(f"--max-request-bytes must be >= 1, got {max_request_bytes}")
    if body_timeout is not None and not 0 < body_timeout < float("inf"):
        raise UsageError(f"--body-timeout must be a number of seconds > 0, got {body_timeout}")
    options = ServeOptions(host=host, port=port, max_batch=max_batch, max_queue=max_queue,
                           token_budget=DEFAULT_TOKEN_BUDGET if token_budget is None else token_budget,
                           decode_deferral_tokens=DEFAULT_DEFERRED_TOKENS if decode_deferral is None
                           else decode_deferral,
                           prefill_chunk=DEFAULT_TOKEN_BUDGET if prefill_chunk is None else prefill_chunk,
                           prefix_cache_bytes=prefix_cache_bytes,
                           backend=backend, threads=threads, device=device, verify=verify, spin=spin,
                           model_name=model_name,
                           max_request_bytes=DEFAULT_MAX_REQUEST_BYTES if max_request_bytes is None
                           else max_request_bytes,
                           body_timeout_s=DEFAULT_BODY_TIMEOUT_S if body_timeout is None else body_timeout)
    scaling = None
    if autoscaling is not None:
        try:
            scaling = json.loads(autoscaling)
        except json.JSONDecodeError as e:
            raise UsageError(f"--autoscaling: not valid JSON ({e.msg})") from None
        if not isinstance(scaling, dict) or not use_ray:
            raise UsageError("--autoscaling: expected a JSON object, together with --ray")
    if use_ray:
        from mtx.serving.ray_app import serve_on_ray

        sys.exit(serve_on_ray(out, options, replicas, scaling))
    from mtx.serving.http import serve as run_server

    sys.exit(run_server(out, options))


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def run() -> None:  # pragma: no cover - console entry for `python -m mtx`
    main(prog_name="mtx")


if __name__ == "__main__":  # pragma: no cover
    run()

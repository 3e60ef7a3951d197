"""What ``mtx serve`` serves: :class:`ServeOptions` and :func:`load_server`, which loads an export
folder into a running :class:`Engine` behind an :class:`OpenAIServer`.

Shared by the uvicorn server (mtx.serving.http) and each Ray Serve replica (mtx.serving.ray_app);
neither the HTTP server nor the routes are started here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mtx.errors import UsageError
from mtx.serving.engine import DEFAULT_DEFERRED_TOKENS, DEFAULT_TOKEN_BUDGET, Engine
from mtx.serving.protocol import DEFAULT_BODY_TIMEOUT_S, DEFAULT_MAX_REQUEST_BYTES

if TYPE_CHECKING:
    from mtx.serving.openai_api import OpenAIServer


@dataclass
class ServeOptions:
    """``mtx serve``'s options: where to listen (``host``, ``port``; the HTTP server's), the request
    limits (``max_request_bytes``: 413 beyond; ``body_timeout_s``: 408 beyond), and how to load the
    model and size its engine (the rest)."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int | None = None  # default: the export's max_batch
    max_queue: int = 64
    token_budget: int = DEFAULT_TOKEN_BUDGET
    decode_deferral_tokens: int = DEFAULT_DEFERRED_TOKENS
    prefill_chunk: int = DEFAULT_TOKEN_BUDGET  # the prefill block: canonical chunks, prefix-cache blocks
    prefix_cache_bytes: int | None = None  # None: the default where the window allows it; 0: off
    backend: str | None = None
    threads: int | None = None
    device: str | None = None
    verify: bool = True
    spin: bool = False  # ONNX Runtime's intra-op spin-wait (mtx.load's ``spin``, default off)
    model_name: str | None = None  # default: the export folder's name
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    body_timeout_s: float = DEFAULT_BODY_TIMEOUT_S

    def __post_init__(self) -> None:
        """The limits checked once, for the CLI and Ray Serve alike (UsageError naming the option)."""
        import math

        for name, low in (("max_request_bytes", 1), ("max_queue", 1), ("token_budget", 1),
                          ("decode_deferral_tokens", 0), ("prefill_chunk", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}", params=(name,))
        t = self.body_timeout_s
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not (t > 0 and math.isfinite(t)):
            raise UsageError(f"body_timeout_s must be a number of seconds > 0, got {t!r}", params=("body_timeout_s",))
        b = self.prefix_cache_bytes
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0):
            raise UsageError(f"prefix_cache_bytes must be an integer >= 0, got {b!r}", params=("prefix_cache_bytes",))
        if not isinstance(self.spin, bool):
            raise UsageError(f"spin must be true or false, got {self.spin!r}", params=("spin",))


def load_server(out: str | Path | None, options: ServeOptions) -> OpenAIServer:
    """Load the export ``out``, start its engine, and return the :class:`OpenAIServer` (engine running;
    the caller closes ``server.engine``)."""
    import mtx.runtime
    from mtx.assets import resolve_checkpoint
    from mtx.manifest import MANIFEST
    from mtx.serving.metrics import ServingMetrics
    from mtx.serving.openai_api import OpenAIServer

    folder = resolve_checkpoint(out)
    # An export's max_batch (mtx.json) is the limit: the engine refuses more. A checkpoint folder
    # (PyTorch reference) has no limit of its own: --max-batch sizes it.
    sized = None if (folder / MANIFEST).is_file() else options.max_batch
    gen = mtx.runtime.load(out, options.backend, threads=options.threads, device=options.device,
                           max_batch=sized, verify=options.verify, prefill_chunk=options.prefill_chunk,
                           prefix_cache_bytes=options.prefix_cache_bytes, spin=options.spin)
    metrics = ServingMetrics()
    engine = Engine(gen, max_batch=options.max_batch, max_queue=options.max_queue,
                    token_budget=options.token_budget, observer=metrics,
                    max_deferred_tokens=options.decode_deferral_tokens)
    name = options.model_name or folder.resolve().name
    server = OpenAIServer(engine, name, folder, metrics, max_request_bytes=options.max_request_bytes,
                          body_timeout_s=options.body_timeout_s)
    engine.start()
    return server

"""``mtx serve``: the OpenAI routes (mtx.serving.openai_api) over one engine, on uvicorn.

SIGTERM (or a first Ctrl-C) drains: the engine stops admitting (new requests get 503, /ready turns
503), running and queued requests go on to their end, then the server exits with status 0. A second
signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mtx.serving.engine import DEFAULT_TOKEN_BUDGET, Engine

log = logging.getLogger("mtx.serving")


@dataclass
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    max_batch: int | None = None  # default: the export's max_batch
    max_queue: int = 64
    token_budget: int = DEFAULT_TOKEN_BUDGET
    backend: str | None = None
    threads: int | None = None
    device: str | None = None
    verify: bool = True
    model_name: str | None = None  # default: the export folder's name


def load_server(out: str | Path | None, options: ServeOptions) -> Any:
    """Load the export, start its engine, and return the :class:`OpenAIServer` (engine running)."""
    import mtx.runtime
    from mtx.assets import resolve_checkpoint
    from mtx.serving.metrics import ServingMetrics
    from mtx.serving.openai_api import OpenAIServer

    from mtx.manifest import MANIFEST

    folder = resolve_checkpoint(out)
    # An export's max_batch (mtx.json) is the limit: the engine refuses more. A checkpoint folder
    # (PyTorch reference) has no limit of its own: --max-batch sizes it.
    sized = None if (folder / MANIFEST).is_file() else options.max_batch
    gen = mtx.runtime.load(out, options.backend, threads=options.threads, device=options.device,
                           max_batch=sized, verify=options.verify)
    metrics = ServingMetrics()
    engine = Engine(gen, max_batch=options.max_batch, max_queue=options.max_queue,
                    token_budget=options.token_budget, observer=metrics)
    name = options.model_name or folder.resolve().name
    server = OpenAIServer(engine, name, folder, metrics)
    engine.start()
    return server


def serve(out: str | Path | None, options: ServeOptions) -> int:
    """Run ``mtx serve`` until SIGTERM / Ctrl-C has drained the engine; returns the exit status."""
    import uvicorn

    from mtx.serving.openai_api import build_app

    server = load_server(out, options)
    engine = server.engine
    config = uvicorn.Config(build_app(server), host=options.host, port=options.port, log_level="warning",
                            access_log=False, lifespan="off", timeout_graceful_shutdown=5)
    http = _DrainingServer(config, engine)
    print(f"mtx serve: model {server.model_name!r} ({engine.backend.name}, max_batch {engine.max_batch}, "
          f"KV {engine.kv_bytes:,} bytes) on http://{options.host}:{options.port}", file=sys.stderr, flush=True)
    try:
        http.run()
    finally:
        engine.close()
    if http.drained:
        print("mtx serve: drained, exiting", file=sys.stderr, flush=True)
    return 0


class _DrainingServer:
    """uvicorn.Server whose first SIGTERM / SIGINT drains the engine before the server exits."""

    def __new__(cls, config: Any, engine: Engine) -> Any:
        import uvicorn

        class Server(uvicorn.Server):
            drained = False

            def handle_exit(self, sig: int, frame: Any) -> None:
                if engine.draining:  # second signal: stop now
                    self.should_exit = True
                    self.force_exit = True
                    return
                engine.begin_drain()
                print(f"mtx serve: {signal.Signals(sig).name}: draining (new requests get 503)", file=sys.stderr,
                      flush=True)

                def wait() -> None:
                    engine.wait_idle()
                    self.drained = True
                    self.should_exit = True

                threading.Thread(target=wait, name="mtx-drain", daemon=True).start()

        return Server(config)

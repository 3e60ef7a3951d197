"""``mtx serve``: the OpenAI routes (mtx.serving.openai_api) over one engine
(mtx.serving.server.load_server), on uvicorn.

SIGTERM (or a first Ctrl-C) drains: the engine stops admitting (new requests get 503, /ready turns
503), running and queued requests go on to their end, then the server exits with status 0. A second
signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from mtx.serving.engine import Engine
from mtx.serving.server import ServeOptions, load_server

log = logging.getLogger("mtx.serving")


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

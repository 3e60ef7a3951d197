"""``mtx serve``: the OpenAI routes (mtx.serving.openai_api) over one engine
(mtx.serving.server.load_server), on uvicorn.

SIGTERM (or a first Ctrl-C) drains: the engine stops admitting (new requests get 503, /ready turns
503), running and queued requests go on to their end, then the server exits with status 0. A second
signal stops at once.

The listening socket is bound before the model loads and before the URL is printed: a host that
does not resolve or is not this machine's is bad input (exit 2), a port in use or not permitted an
environment failure (exit 1) — one ``mtx: error:`` line naming --host / --port either way.
"""

from __future__ import annotations

import errno
import logging
import signal
import socket
import sys
import threading
from pathlib import Path
from typing import Any

from mtx.errors import MtxError, UsageError
from mtx.serving.engine import Engine
from mtx.serving.server import ServeOptions, load_server

log = logging.getLogger("mtx.serving")


class ListenError(MtxError):
    """The server cannot listen on its port (in use, not permitted): the environment, exit code 1."""

    exit_code = 1


def bind(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``host``:``port`` and listening, as uvicorn would bind it (SO_REUSEADDR,
    which still refuses a port another socket listens on). It listens at once, so a second server on
    the same port fails here, before it loads its model; connections wait in the backlog meanwhile."""
    try:
        family, type_, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                              flags=socket.AI_PASSIVE)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise UsageError(f"host {host!r}: cannot resolve this address ({getattr(e, 'strerror', None) or e})",
                         params=("host",)) from None
    sock = socket.socket(family, type_, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # uvicorn's default backlog
    except OSError as e:
        sock.close()
        if e.errno == errno.EADDRNOTAVAIL:
            raise UsageError(f"host {host!r}: not an address of this machine ({e.strerror})",
                             params=("host",)) from None
        if e.errno == errno.EADDRINUSE:
            raise ListenError(f"port {port}: {host}:{port} is already in use", params=("port",)) from None
        raise ListenError(f"port {port}: cannot listen on {host}:{port} ({e.strerror})", params=("port",)) from None
    return sock


def serve(out: str | Path | None, options: ServeOptions) -> int:
    """Run ``mtx serve`` until SIGTERM / Ctrl-C has drained the engine; returns the exit status."""
    import uvicorn

    from mtx.serving.openai_api import build_app

    sock = bind(options.host, options.port)
    try:
        server = load_server(out, options)
    except BaseException:
        sock.close()
        raise
    engine = server.engine
    config = uvicorn.Config(build_app(server), log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=5)
    http = _DrainingServer(config, engine)
    port = sock.getsockname()[1]
    url_host = f"[{options.host}]" if ":" in options.host else options.host  # an IPv6 address in a URL
    print(f"mtx serve: model {server.model_name!r} ({engine.backend.name}, max_batch {engine.max_batch}, "
          f"KV {engine.kv_bytes:,} bytes, prefix cache {engine.generator.prefix_cache_status}) "
          f"on http://{url_host}:{port}", file=sys.stderr, flush=True)
    try:
        http.run(sockets=[sock])
    finally:
        server.close()
        sock.close()
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

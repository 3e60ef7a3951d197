"""Scale-out on Ray Serve: one engine per replica, behind Ray Serve's HTTP proxy, same OpenAI routes.

    mtx serve OUT --ray --replicas 2 --port 8000
    serve run mtx.serving.ray_app:build out=OUT replicas=2          # or Ray's own CLI
    serve run mtx.serving.ray_app:build out=OUT autoscaling='{"min_replicas": 1, "max_replicas": 4}'

Each replica (a Ray actor) loads the export, starts its own :class:`Engine` and serves the routes of
mtx.serving.openai_api through ``@serve.ingress(app)``. Ray's router spreads requests over replicas;
each replica batches its own. ``autoscaling`` is Ray Serve's ``autoscaling_config``, passed as given
(then ``replicas`` is ignored). A replica asks Ray for ``threads`` CPUs (default 1).
"""

from __future__ import annotations

import json
import signal
import sys
import threading
from dataclasses import asdict
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from ray import serve

from mtx.serving.openai_api import add_routes
from mtx.serving.protocol import ApiError
from mtx.serving.server import ServeOptions, load_server

app = FastAPI(title="mtx serve (Ray Serve)", docs_url=None, redoc_url=None)


def replica_server() -> Any:
    """The OpenAIServer of the replica handling this request (its deployment object's)."""
    server = getattr(serve.get_replica_context().servable_object, "server", None)
    if server is None:
        raise ApiError(503, "this replica is still loading the model", None, "service_unavailable")
    return server


add_routes(app, replica_server)


@serve.deployment(name="mtx", graceful_shutdown_timeout_s=60)
@serve.ingress(app)
class MtxDeployment:
    """One replica: the export ``out`` loaded with ``options`` (ServeOptions fields as a dict)."""

    def __init__(self, out: str | None, options: dict[str, Any]) -> None:
        self.server = load_server(out, ServeOptions(**options))

    def __del__(self) -> None:
        server = getattr(self, "server", None)
        if server is not None:
            server.close()


def application(out: str | Path | None, options: ServeOptions, replicas: int = 1,
                autoscaling: dict[str, Any] | None = None) -> Any:
    """The bound Ray Serve application (pass it to ``serve.run``)."""
    fields = {k: v for k, v in asdict(options).items() if k not in ("host", "port")}
    if options.model_name is None:
        from mtx.assets import resolve_checkpoint

        fields["model_name"] = resolve_checkpoint(out).resolve().name
    deployment_options: dict[str, Any] = {"ray_actor_options": {"num_cpus": options.threads or 1}}
    if autoscaling:
        deployment_options["autoscaling_config"] = autoscaling
    else:
        deployment_options["num_replicas"] = replicas
    return MtxDeployment.options(**deployment_options).bind(None if out is None else str(Path(out).resolve()), fields)


def build(args: dict[str, str]) -> Any:
    """``serve run mtx.serving.ray_app:build out=OUT [replicas=N] [autoscaling=JSON] [max_batch=N]
    [max_request_bytes=N] [body_timeout_s=S] [spin=true|false] ...``."""
    args = dict(args)
    out = args.pop("out", None)
    replicas = int(args.pop("replicas", 1))
    autoscaling = json.loads(args.pop("autoscaling")) if "autoscaling" in args else None
    ints = {"max_batch", "max_queue", "token_budget", "decode_deferral_tokens", "threads", "max_request_bytes",
            "prefill_chunk", "prefix_cache_bytes"}
    floats = {"body_timeout_s"}
    fields: dict[str, Any] = {k: (int(v) if k in ints else float(v) if k in floats else v) for k, v in args.items()}
    for flag in ("verify", "spin"):
        if flag in fields:
            fields[flag] = _flag(flag, fields[flag])
    return application(out, ServeOptions(**fields), replicas, autoscaling)


def _flag(name: str, value: Any) -> bool:
    """A build argument's boolean: true/false, 1/0, yes/no (any case); anything else is a UsageError."""
    from mtx.errors import UsageError

    text = str(value).strip().lower()
    if text in ("1", "true", "yes"):
        return True
    if text in ("0", "false", "no"):
        return False
    raise UsageError(f"{name}: expected true or false, got {value!r}", params=(name,))


def serve_on_ray(out: str | Path | None, options: ServeOptions, replicas: int,
                 autoscaling: dict[str, Any] | None = None) -> int:
    """``mtx serve --ray``: start (or join) Ray, run the application on host:port, wait for Ctrl-C /
    SIGTERM (a signal during start-up is acted on once the application runs), then shut Serve down
    (replicas drain for up to graceful_shutdown_timeout_s)."""
    import ray

    if not ray.is_initialized():
        ray.init(include_dashboard=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):  # replaces Ray's handler, which ends the driver at once
        signal.signal(sig, lambda *_: stop.set())
    serve.start(http_options={"host": options.host, "port": options.port})
    serve.run(application(out, options, replicas, autoscaling), name="mtx", route_prefix="/")
    print(f"mtx serve: Ray Serve, {replicas} replica(s) on http://{options.host}:{options.port}", file=sys.stderr,
          flush=True)
    try:
        while not stop.wait(1):
            pass
    finally:
        print("mtx serve: shutting down Ray Serve (replicas drain running requests)", file=sys.stderr, flush=True)
        serve.shutdown()
        ray.shutdown()
        print("mtx serve: Ray Serve shut down", file=sys.stderr, flush=True)
    return 0

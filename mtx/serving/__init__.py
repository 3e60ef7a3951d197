"""mtx.serving: continuous batching over one loaded model, and the OpenAI-compatible HTTP server.

    import mtx.runtime
    from mtx.serving import Engine
    with Engine(mtx.runtime.load("OUT"), max_batch=8) as engine:
        tokens = engine.submit("def fib(n):", max_tokens=32).result().tokens

``mtx serve OUT`` (mtx.serving.http) puts the OpenAI routes in front of an :class:`Engine`;
mtx.serving.ray_app runs one engine per Ray Serve replica.
"""

from mtx.serving.engine import (Completion, Engine, EngineBusy, EngineDraining, EngineStats, Event,
                                RequestHandle)

__all__ = ["Completion", "Engine", "EngineBusy", "EngineDraining", "EngineStats", "Event", "RequestHandle"]

"""Prometheus metrics of one engine (prometheus-client), in a registry of their own.

Names: ``mtx_requests_running`` and ``mtx_requests_waiting`` (gauges, read from the engine at scrape
time), ``mtx_kv_cache_bytes`` (the fixed KV state), ``mtx_time_to_first_token_seconds`` and
``mtx_time_per_output_token_seconds`` (histograms), ``mtx_prompt_tokens_total`` and
``mtx_generation_tokens_total`` (counters), ``mtx_requests_finished_total{reason}`` and
``mtx_requests_rejected_total{status}`` (counters).
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, 30.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)


class ServingMetrics:
    """The engine's observer (``request_finished``) and the HTTP layer's counters."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.running = Gauge("mtx_requests_running", "Requests holding a KV row", registry=r)
        self.waiting = Gauge("mtx_requests_waiting", "Requests queued for a free row", registry=r)
        self.kv_bytes = Gauge("mtx_kv_cache_bytes", "Bytes of the engine's KV state (max_batch x C slots, fixed)",
                              registry=r)
        self.ttft = Histogram("mtx_time_to_first_token_seconds", "Submission to first token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.tpot = Histogram("mtx_time_per_output_token_seconds", "Mean time between output tokens of a request",
                              buckets=TPOT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("mtx_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.generation_tokens = Counter("mtx_generation_tokens", "Tokens generated", registry=r)
        self.finished = Counter("mtx_requests_finished", "Requests finished, by reason", ["reason"], registry=r)
        self.rejected = Counter("mtx_requests_rejected", "Responses with an HTTP error status (4xx, 5xx), by status",
                                ["status"], registry=r)

    def bind(self, engine: Any) -> None:
        """Read running / waiting from ``engine`` at every scrape."""
        self.running.set_function(lambda: engine.stats().running)
        self.waiting.set_function(lambda: engine.stats().waiting)
        self.kv_bytes.set(engine.kv_bytes)

    def request_finished(self, prompt_tokens: int, output_tokens: int, ttft_s: float | None, tpot_s: float | None,
                         reason: str) -> None:
        self.prompt_tokens.inc(prompt_tokens)
        self.generation_tokens.inc(output_tokens)
        self.finished.labels(reason=reason).inc()
        if ttft_s is not None:
            self.ttft.observe(ttft_s)
        if tpot_s is not None:
            self.tpot.observe(tpot_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)

"""Prometheus metrics of one engine (prometheus-client), in a registry of their own.

Names: ``mtx_requests_running`` and ``mtx_requests_waiting`` (gauges, read from the engine at scrape
time), ``mtx_kv_cache_bytes`` (the fixed KV state), ``mtx_time_to_first_token_seconds`` and
``mtx_time_per_output_token_seconds`` (histograms), ``mtx_prompt_tokens_total`` and
``mtx_generation_tokens_total`` (counters), ``mtx_requests_finished_total{reason}`` and
``mtx_requests_rejected_total{status}`` (counters); the prefix cache's ``mtx_prefix_cache_hits_total``,
``mtx_prefix_cache_misses_total``, ``mtx_prefix_cache_tokens_reused_total``,
``mtx_prefix_cache_evicted_blocks_total`` (counters) and ``mtx_prefix_cache_bytes`` (gauge); speculative
decoding's ``mtx_spec_decode_verifications_total``, ``mtx_spec_decode_draft_tokens_total``,
``mtx_spec_decode_accepted_tokens_total`` (counters) and ``mtx_spec_decode_acceptance_rate`` (gauge:
accepted / drafted since start). The last two groups are read from the engine at scrape time.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

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
        """Read running / waiting, the prefix cache's and speculative decoding's counters from ``engine``
        at every scrape."""
        self.running.set_function(lambda: engine.stats().running)
        self.waiting.set_function(lambda: engine.stats().waiting)
        self.kv_bytes.set(engine.kv_bytes)
        self.registry.register(_EngineCollector(engine))


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


class _EngineCollector:
    """The engine's own counters (prefix cache, speculative decoding), read when scraped."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    def collect(self) -> Any:
        cache = self.engine.core.prefix_cache
        if cache is not None:
            st = cache.stats
            for name, doc, value in (("hits", "Requests that started from a cached prompt prefix", st.hits),
                                     ("misses", "Requests that found no cached prefix", st.misses),
                                     ("tokens_reused", "Prompt tokens taken from the prefix cache", st.tokens_reused),
                                     ("evicted_blocks", "Prefix cache blocks evicted (LRU)", st.blocks_evicted)):
                yield CounterMetricFamily(f"mtx_prefix_cache_{name}", doc, value=value)
            yield GaugeMetricFamily("mtx_prefix_cache_bytes", "Bytes held by the prefix cache", value=st.bytes)
        spec = self.engine.core.spec_stats
        for name, doc, value in (("verifications", "Speculative verification calls", spec.verifications),
                                 ("draft_tokens", "Draft tokens verified", spec.drafted),
                                 ("accepted_tokens", "Draft tokens accepted", spec.accepted)):
            yield CounterMetricFamily(f"mtx_spec_decode_{name}", doc, value=value)
        yield GaugeMetricFamily("mtx_spec_decode_acceptance_rate", "Accepted / drafted tokens since start",
                                value=spec.accepted / spec.drafted if spec.drafted else 0.0)

"""The serving engine: the generation core (:class:`~mtx.runtime.core.BatchCore`) on a thread of its own.

The engine adds only what a server needs around the core: a thread running ``step()``, a bounded inbox
of submitted requests, cancellation from other threads, sinks for each request's events, drain, and the
metrics observer. Everything else — admission, the calls of a step, sampling, stop strings, text — is
the core's, so a request's tokens equal ``Generator.generate([prompt], ...)`` run alone by construction.

Invariants:
* ONE backend state of ``max_batch`` rows, allocated at construction (``max_batch x C`` KV slots per
  layer, whatever the load).
* :meth:`Engine.submit` and :meth:`RequestHandle.cancel` may be called from any thread and never wait
  for a step; a request's events go to its ``sink``, called on the engine thread (an asyncio caller
  passes ``loop.call_soon_threadsafe``-wrapped callables). Without a sink, a handle is a blocking iterator.
* A failure in one request (its sampling, its text) or in one graph call ends only the requests
  concerned, with finish reason ``"error"``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mtx.errors import UsageError
from mtx.runtime.core import FINISH_REASONS, RequestOutput
from mtx.runtime.generator import Generator
from mtx.runtime.request import Prompt, Request, with_new_id

log = logging.getLogger("mtx.serving")

#: Prompt + decode tokens one step may feed (decode rows count one each). With decode deferred during a
#: burst (DEFAULT_DEFERRED_TOKENS), a small budget lets the first prompts of a burst stream sooner: on
#: the 125M Mistral, 8 / 16 128-token prompts arriving together (scripts/bench_serve.py --budgets
#: 128,256,512, load average 1.5-1.8), TTFT p50 0.70 / 1.21 s at 128, 0.75 / 1.29 s at 256, 0.72 /
#: 1.42 s at 512, with the same aggregate decode and inter-token p99 (0.03-0.04 s). It also bounds the
#: stall one new request puts on running streams to one 128-token step.
DEFAULT_TOKEN_BUDGET = 128
#: Prompt tokens that may be fed while running streams wait (mtx.runtime.scheduler.defer_decode): a burst
#: of arrivals up to this size (16 prompts of 256 tokens) is prefilled before the streams decode again, so
#: each stream stalls once per burst, not once per prefill step.
DEFAULT_DEFERRED_TOKENS = 4096


class EngineBusy(Exception):
    """The waiting queue is full (HTTP 429)."""


class EngineDraining(Exception):
    """The engine stopped admitting requests (shutting down; HTTP 503)."""


@dataclass(frozen=True)
class Event:
    """``kind`` "token" (``token`` set, ``text`` its visible text delta) or "finish" (``finish_reason`` one
    of FINISH_REASONS, ``text`` any visible text released at the end; ``message`` set for "error").
    A token's ``logprobs`` (:class:`~mtx.runtime.sampling.TokenLogprobs`) when its request asks for them."""

    kind: str
    token: int | None = None
    finish_reason: str | None = None
    message: str | None = None
    text: str = ""
    logprobs: Any = None


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str


class RequestHandle:
    """One submitted request. Iterate it (no sink given) for its tokens, or call :meth:`result`."""

    def __init__(self, request: Request, sink: Callable[[Event], None] | None,
                 on_cancel: Callable[[RequestHandle], None]) -> None:
        self.request = request
        self.id = request.request_id
        self.prompt_ids = list(request.prompt_ids)
        self._queue: queue.Queue[Event] | None = None if sink is not None else queue.Queue()
        self.sink: Callable[[Event], None] = sink if sink is not None else self._queue.put  # type: ignore[union-attr]
        self.cancelled = threading.Event()
        self.finish_reason: str | None = None
        self.t_submit = time.perf_counter()
        self.t_first: float | None = None
        self.n_tokens = 0
        self._on_cancel = on_cancel

    def cancel(self) -> None:
        """Ask the engine to stop this request and free its row (at the next step). Idempotent."""
        if not self.cancelled.is_set():
            self.cancelled.set()
            self._on_cancel(self)

    def __iter__(self) -> Iterator[int]:
        if self._queue is None:
            raise RuntimeError("this request delivers its events to a sink; it cannot be iterated")
        while True:
            ev = self._queue.get()
            if ev.kind == "token":
                yield int(ev.token)  # type: ignore[arg-type]
                continue
            self.finish_reason = ev.finish_reason
            if ev.finish_reason == "error":
                raise RuntimeError(f"request {self.id} failed: {ev.message}")
            return

    def result(self) -> Completion:
        tokens = list(self)
        return Completion(tokens, self.finish_reason or "error")


@dataclass
class EngineStats:
    running: int
    waiting: int
    max_batch: int
    max_queue: int
    kv_bytes: int
    steps: int
    finished: dict[str, int] = field(default_factory=dict)


class Engine:
    """Continuous batching over one :class:`Generator`'s backend. Call :meth:`start` (or use ``with``)."""

    def __init__(self, generator: Generator, max_batch: int | None = None, max_queue: int = 64,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, observer: Any | None = None,
                 max_deferred_tokens: int = DEFAULT_DEFERRED_TOKENS) -> None:
        """``observer``: optional object with ``request_finished(prompt_tokens, output_tokens, ttft_s,
        tpot_s, reason)`` called on the engine thread (the Prometheus metrics of mtx.serving.metrics)."""
        if max_queue is None or isinstance(max_queue, bool) or not isinstance(max_queue, int) or max_queue < 1:
            raise UsageError(f"max_queue must be an integer >= 1, got {max_queue!r}", params=("max_queue",))
        self.generator = generator
        self.backend = generator.backend
        self.core = generator.core(self.backend.max_batch if max_batch is None else max_batch, token_budget,
                                   max_deferred_tokens)
        self.max_batch = self.core.max_batch
        self.max_queue = max_queue
        self.token_budget = token_budget
        self.observer = observer
        self.state = self.core.state
        self.kv_bytes = self.core.kv_bytes
        self._inbox: deque[RequestHandle] = deque()      # submitted, not yet given to the core
        self._cancels: list[int] = []                     # request ids to abort in the core
        self._handles: dict[int, RequestHandle] = {}      # every request given to the core, until it finishes
        self._core_waiting: set[int] = set()              # ids in the core's waiting queue (as of the last step)
        self._running = 0
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._draining = False
        self._closing = False
        self._finished: dict[str, int] = {r: 0 for r in FINISH_REASONS}
        self._thread = threading.Thread(target=self._loop, name="mtx-engine", daemon=True)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self) -> Engine:
        self._thread.start()
        return self

    def __enter__(self) -> Engine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def begin_drain(self) -> None:
        """Refuse new requests (EngineDraining); running and waiting ones go on to the end."""
        with self._lock:
            self._draining = True

    @property
    def alive(self) -> bool:
        """The engine thread runs steps."""
        return self._thread.is_alive()

    @property
    def draining(self) -> bool:
        return self._draining

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no request is running or waiting; False on timeout."""
        end = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._busy():
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._wake.wait(left if left is not None else 0.5)
            return True

    def close(self) -> None:
        """Cancel everything in flight and stop the engine thread. Every request gets its finish event."""
        with self._lock:
            self._closing = True
            self._draining = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        self._finish_all("cancelled")  # nothing left after a clean stop; what a dead thread left, or a never-started engine

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, prompt: Prompt | Request, max_tokens: int = 16, *,
               sink: Callable[[Event], None] | None = None, **options: Any) -> RequestHandle:
        """Validate a request (UsageError naming the field) and queue it. Never waits for a step.

        ``prompt`` is text, token ids, or a prepared :class:`~mtx.runtime.request.Request` (run under a
        fresh id, so one Request may be submitted many times). Options mean what they mean for
        :meth:`Generator.generate` (``temperature``, ``top_k``, ``top_p``, ``repetition_penalty``,
        ``seed``, ``stop``, ``stop_token_ids``, ``want_text``): ``max_tokens`` new tokens at most,
        ``stop_token_ids`` default the model's EOS ids. Raises EngineBusy when ``max_queue`` requests
        already wait, EngineDraining once :meth:`begin_drain` was called.
        """
        request = with_new_id(prompt) if isinstance(prompt, Request) else self.generator.request(
            prompt, max_tokens, **options)
        handle = RequestHandle(request, sink, self._cancel)
        with self._lock:
            if self._draining:
                raise EngineDraining("the server is shutting down and admits no new requests")
            if self._queued() >= self.max_queue:
                raise EngineBusy(f"the waiting queue is full ({self.max_queue} requests); retry later")
            self._inbox.append(handle)
            self._wake.notify_all()
        return handle

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(running=self._running, waiting=self._queued(), max_batch=self.max_batch,
                               max_queue=self.max_queue, kv_bytes=self.kv_bytes, steps=self.core.steps,
                               finished=dict(self._finished))

    # -- internals (lock held where noted) ---------------------------------------------------------
    def _queued(self) -> int:
        """Requests waiting for a row: in the inbox, or in the core's queue (lock held). A cancelled
        request leaves the inbox at once; one in the core's queue is counted until the next step."""
        return len(self._inbox) + len(self._core_waiting)

    def _busy(self) -> bool:
        return bool(self._inbox) or bool(self._handles)

    def _cancel(self, handle: RequestHandle) -> None:
        """A request still in the inbox finishes at once (its queue slot freed; its finish event sent on
        the caller's thread, outside the engine's lock); one the core holds is aborted at the next step."""
        with self._lock:
            queued = handle in self._inbox
            if queued:
                self._inbox.remove(handle)
            else:
                self._cancels.append(handle.id)
            self._wake.notify_all()
        if queued:
            self._deliver_finish(handle, "cancelled")

    def _finish_all(self, reason: str) -> None:
        """Finish every request still held (inbox and core) with ``reason``; the engine thread is not running."""
        with self._lock:
            doomed = list(self._handles.values()) + list(self._inbox)
            self._handles.clear()
            self._inbox.clear()
            self._core_waiting = set()
            self._running = 0
        for h in doomed:
            self._deliver_finish(h, reason)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self._busy():
                    self._wake.wait()
                if self._closing:
                    break
                for h in self._inbox:
                    self._handles[h.id] = h
                    self.core.add(h.request)
                    self._core_waiting.add(h.id)
                self._inbox.clear()
                for rid in self._cancels:
                    if rid in self._handles:
                        self.core.abort(rid)
                self._cancels.clear()
            try:
                outputs = self.core.step()
            except Exception as e:  # noqa: BLE001 - the core confines failures; this is a last resort
                log.exception("engine step failed")
                failed = list(self._handles)
                for rid in failed:
                    self.core.abort(rid)  # their rows are freed at the next step (its outputs are ignored)
                outputs = [RequestOutput(rid, None, finish_reason="error", message=f"{type(e).__name__}: {e}")
                           for rid in failed]
            for o in outputs:
                self._deliver(o)
            with self._lock:
                self._running = self.core.running
                self._core_waiting = {r.request_id for r in self.core.waiting}
                self._wake.notify_all()
        self._finish_all("cancelled")

    def _deliver(self, o: RequestOutput) -> None:
        h = self._handles.get(o.request_id)
        if h is None:
            return
        if o.token is not None:
            if h.t_first is None:
                h.t_first = time.perf_counter()
            h.n_tokens += 1
            if not self._send(h, Event("token", token=o.token, text=o.text if o.finish_reason is None else "",
                                       logprobs=o.logprobs)):
                return
        if o.finish_reason is not None:
            if o.finish_reason == "error":
                log.error("request %d failed: %s", o.request_id, o.message)
            with self._lock:
                self._handles.pop(o.request_id, None)
            self._deliver_finish(h, o.finish_reason, o.message, text=o.text if o.token is not None else "")

    def _send(self, h: RequestHandle, event: Event) -> bool:
        """Call ``h``'s sink. A sink that raises cancels its own request (its row freed at the next step,
        no further events); the engine goes on. False if it raised."""
        try:
            h.sink(event)
            return True
        except Exception:  # noqa: BLE001 - a consumer's failure is its own request's
            log.exception("request %d: its sink failed; cancelling it", h.id)
            with self._lock:
                self._handles.pop(h.id, None)
                self._finished["cancelled"] = self._finished.get("cancelled", 0) + 1
            h.cancelled.set()
            h.finish_reason = "cancelled"
            self.core.abort(h.id)
            return False

    def _deliver_finish(self, h: RequestHandle, reason: str, message: str | None = None, text: str = "") -> None:
        """Count ``h``'s end, report it to the observer, and send its finish event (never under the lock)."""
        with self._lock:
            self._finished[reason] = self._finished.get(reason, 0) + 1
        if self.observer is not None:
            now = time.perf_counter()
            ttft = None if h.t_first is None else h.t_first - h.t_submit
            tpot = (now - h.t_first) / (h.n_tokens - 1) if h.t_first is not None and h.n_tokens > 1 else None
            try:
                self.observer.request_finished(len(h.prompt_ids), h.n_tokens, ttft, tpot, reason)
            except Exception:  # noqa: BLE001 - metrics never break serving
                log.exception("metrics observer failed")
        h.finish_reason = reason
        try:
            h.sink(Event("finish", finish_reason=reason, message=message, text=text))
        except Exception:  # noqa: BLE001 - a consumer's failure is its own request's
            log.exception("request %d: its sink failed on the finish event", h.id)

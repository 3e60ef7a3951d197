"""The continuous-batching engine: one KV state of ``max_batch`` rows, one thread running steps.

Invariants:
* The engine owns ONE backend state ``backend.new_state(max_batch)``, allocated at start and never
  reallocated: KV memory is ``max_batch x C`` slots per layer, whatever the load (no paged cache).
* A waiting request is admitted into the lowest free row between steps and starts at position 0;
  nothing of the row's previous request is resident for it (docs/ops.md §1 rule 3).
* Each request samples with its own ``TokenRng(seed)`` (stream 0) and :func:`select_token`, on the
  logits of its own row, so its tokens equal ``Generator.generate([prompt], ...)`` run alone —
  greedy or seeded — whatever else is in flight and whenever it joined.
* A row is freed in the step its request finishes (stop token, stop string, ``max_tokens``) or in
  the first step after it is cancelled.

Threads: :meth:`Engine.submit` and :meth:`RequestHandle.cancel` may be called from any thread; a
request's events go to its ``sink``, called on the engine thread (an asyncio caller passes
``loop.call_soon_threadsafe``-wrapped callables). Without a sink, a handle is a blocking iterator.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mtx.errors import UsageError
from mtx.runtime.generator import Generator, Prompt, _check_max_new_tokens, _RowStop
from mtx.runtime.sampling import SamplingParams, TokenRng, check_seed, select_token
from mtx.serving.scheduler import Phase, plan_step

log = logging.getLogger("mtx.serving")

#: Prompt + decode tokens one step may feed (decode rows count one each). Measured on the 125M
#: Mistral with 8 128-token prompts arriving together (scripts/bench_serve.py, README): budgets
#: 512 and 1024 gave the same TTFT (p50 0.37 / 0.38 s), 128 and 256 a later one; 512 halves the
#: longest stall a step of new prompts puts on running streams.
DEFAULT_TOKEN_BUDGET = 512
FINISH_REASONS = ("stop", "length", "cancelled", "error")


class EngineBusy(Exception):
    """The waiting queue is full (HTTP 429)."""


class EngineDraining(Exception):
    """The engine stopped admitting requests (shutting down; HTTP 503)."""


@dataclass(frozen=True)
class Event:
    """``kind`` "token" (``token`` set) or "finish" (``finish_reason`` one of FINISH_REASONS;
    ``message`` set for "error")."""

    kind: str
    token: int | None = None
    finish_reason: str | None = None
    message: str | None = None


@dataclass
class Completion:
    tokens: list[int]
    finish_reason: str


class RequestHandle:
    """One submitted request. Iterate it (no sink given) for its tokens, or call :meth:`result`."""

    def __init__(self, request_id: int, prompt_ids: list[int], sink: Callable[[Event], None] | None) -> None:
        self.id = request_id
        self.prompt_ids = prompt_ids
        self._queue: queue.Queue[Event] | None = None if sink is not None else queue.Queue()
        self.sink: Callable[[Event], None] = sink if sink is not None else self._queue.put  # type: ignore[union-attr]
        self.cancelled = threading.Event()
        self.finish_reason: str | None = None

    def cancel(self) -> None:
        """Ask the engine to stop this request and free its row (at the next step)."""
        self.cancelled.set()

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
class _Active:
    """A request inside the engine. ``fed``: tokens in its row's KV (its next position)."""

    handle: RequestHandle
    ids: list[int]
    params: SamplingParams
    rng: TokenRng
    stop: _RowStop
    max_tokens: int
    t_submit: float
    row: int = -1
    fed: int = 0
    next_token: int = 0
    t_first: float | None = None
    order: int = 0

    @property
    def phase(self) -> Phase:
        return Phase.PREFILL if self.fed < len(self.ids) else Phase.DECODE


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
                 token_budget: int = DEFAULT_TOKEN_BUDGET, observer: Any | None = None) -> None:
        """``observer``: optional object with ``request_finished(prompt_tokens, output_tokens, ttft_s,
        tpot_s, reason)`` called on the engine thread (the Prometheus metrics of mtx.serving.metrics)."""
        be = generator.backend
        limit = be.max_batch
        if max_batch is None:
            max_batch = limit
        for name, value, low in (("max_batch", max_batch, 1), ("max_queue", max_queue, 1),
                                 ("token_budget", token_budget, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}", params=(name,))
        if max_batch > limit:
            raise UsageError(f"max_batch {max_batch} exceeds the maximum batch {limit} of this export "
                             f"(export again with a larger max_batch)", params=("max_batch",))
        self.generator = generator
        self.backend = be
        self.max_batch = max_batch
        self.max_queue = max_queue
        self.token_budget = token_budget
        self.observer = observer
        self.state = be.new_state(max_batch)
        self.kv_bytes = be.state_nbytes(self.state)
        self._rows: list[_Active | None] = [None] * max_batch
        self._waiting: deque[_Active] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._ids = itertools.count(1)
        self._order = itertools.count()
        self._draining = False
        self._closing = False
        self._steps = 0
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
        """Cancel everything in flight and stop the engine thread."""
        with self._lock:
            self._closing = True
            self._draining = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join()

    # -- requests ----------------------------------------------------------------------------------
    def submit(self, prompt: Prompt, max_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, repetition_penalty: float = 1.0, seed: int | None = None,
               stop: Sequence[str] | str | None = None, stop_token_ids: Sequence[int] | None = None,
               sink: Callable[[Event], None] | None = None) -> RequestHandle:
        """Validate a request (UsageError naming the field) and queue it.

        Options mean what they mean for :meth:`Generator.generate`: ``max_tokens`` new tokens at most,
        ``stop_token_ids`` default the model's EOS ids. Raises EngineBusy when ``max_queue`` requests
        already wait, EngineDraining once :meth:`begin_drain` was called.
        """
        g = self.generator
        _check_max_new_tokens(max_tokens)
        params = SamplingParams(temperature, top_k, top_p, repetition_penalty)
        params.validate()
        check_seed(seed)
        ids = g.to_ids(prompt)
        self.backend.check_positions(len(ids) + max_tokens)
        stopper = g._stopper(stop_token_ids, stop)
        handle = RequestHandle(next(self._ids), ids, sink)
        active = _Active(handle, ids, params, TokenRng(seed), stopper, max_tokens, time.perf_counter())
        with self._lock:
            if self._draining:
                raise EngineDraining("the server is shutting down and admits no new requests")
            if len(self._waiting) >= self.max_queue:
                self._drop_cancelled_waiting()
            if len(self._waiting) >= self.max_queue:
                raise EngineBusy(f"the waiting queue is full ({self.max_queue} requests); retry later")
            self._waiting.append(active)
            self._wake.notify_all()
        return handle

    def stats(self) -> EngineStats:
        with self._lock:
            return EngineStats(running=sum(r is not None for r in self._rows), waiting=len(self._waiting),
                               max_batch=self.max_batch, max_queue=self.max_queue, kv_bytes=self.kv_bytes,
                               steps=self._steps, finished=dict(self._finished))

    # -- the engine thread ---------------------------------------------------------------------------
    def _busy(self) -> bool:
        return bool(self._waiting) or any(r is not None for r in self._rows)

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._closing and not self._busy():
                    self._wake.wait()
                if self._closing:
                    break
                self._admit()
            try:
                self._step()
            except Exception as e:  # noqa: BLE001 - a failed call fails its requests, not the server
                log.exception("engine step failed")
                for a in [r for r in self._rows if r is not None]:
                    self._finish(a, "error", f"{type(e).__name__}: {e}")
        with self._lock:
            doomed = [r for r in self._rows if r is not None] + list(self._waiting)
            self._waiting.clear()
        for a in doomed:
            self._finish(a, "cancelled")

    def _drop_cancelled_waiting(self) -> None:
        """Finish waiting requests that were cancelled, whether or not a row is free (lock held)."""
        if any(a.handle.cancelled.is_set() for a in self._waiting):
            keep = deque()
            for a in self._waiting:
                if a.handle.cancelled.is_set():
                    self._finish(a, "cancelled", locked=True)
                else:
                    keep.append(a)
            self._waiting = keep

    def _admit(self) -> None:
        """Move waiting requests into free rows, lowest row first (lock held)."""
        self._drop_cancelled_waiting()
        for row in range(self.max_batch):
            if not self._waiting:
                return
            if self._rows[row] is not None:
                continue
            while self._waiting:
                a = self._waiting.popleft()
                if a.handle.cancelled.is_set():
                    self._finish(a, "cancelled", locked=True)
                    continue
                if a.max_tokens == 0:  # nothing to generate: Generator yields no token either
                    self._finish(a, "length", locked=True)
                    continue
                a.row, a.fed, a.order = row, 0, next(self._order)
                self._rows[row] = a
                break

    def _step(self) -> None:
        for a in [r for r in self._rows if r is not None]:
            if a.handle.cancelled.is_set():
                self._finish(a, "cancelled")
        rows = self._rows
        phases = [Phase.IDLE if a is None else a.phase for a in rows]
        prefilling = sorted((a for a in rows if a is not None and a.phase is Phase.PREFILL), key=lambda a: a.order)
        plan = plan_step(phases, {a.row: len(a.ids) - a.fed for a in prefilling}, [a.row for a in prefilling],
                         self.token_budget, self.generator.prefill_chunk)
        if plan.empty:
            return
        self._steps += 1
        for span in plan.decode_spans:
            self._decode(span)
        for row, n in plan.prefill:
            self._prefill(rows[row], n)  # type: ignore[arg-type]

    def _decode(self, span: slice) -> None:
        """One decode call over ``span``: DECODE rows feed their token, IDLE rows a dummy at position 0."""
        n = span.stop - span.start
        ids = np.zeros((n, 1), dtype=np.int64)
        pos = np.zeros(n, dtype=np.int64)
        members = []
        for i, a in enumerate(self._rows[span]):
            if a is not None:
                assert a.phase is Phase.DECODE, "a decode span never holds a prefilling row"
                ids[i, 0], pos[i] = a.next_token, a.fed
                members.append((i, a))
        logits = self.backend.run(self.state, span, ids, pos, last_only=True)
        for i, a in members:
            a.fed += 1
            self._sample(a, logits[i, -1])

    def _prefill(self, a: _Active, n: int) -> None:
        chunk = np.asarray([a.ids[a.fed:a.fed + n]], dtype=np.int64)
        logits = self.backend.run(self.state, slice(a.row, a.row + 1), chunk, np.asarray([a.fed], dtype=np.int64),
                                  last_only=True)
        a.fed += n
        if a.fed == len(a.ids):
            self._sample(a, logits[0, -1])

    def _sample(self, a: _Active, logits: np.ndarray) -> None:
        """Pick the request's next token from its row's logits [V], emit it, finish or queue it to feed."""
        seen = np.asarray(a.ids + a.stop.generated, dtype=np.int64) if a.params.repetition_penalty != 1.0 else None
        tok = select_token(logits, a.params, a.rng, seen)
        done = a.stop.add(tok)
        if a.t_first is None:
            a.t_first = time.perf_counter()
        a.handle.sink(Event("token", token=tok))
        if done:
            self._finish(a, "stop")
        elif len(a.stop.generated) >= a.max_tokens:
            self._finish(a, "length")
        else:
            a.next_token = tok

    def _finish(self, a: _Active, reason: str, message: str | None = None, locked: bool = False) -> None:
        """Free ``a``'s row (if it has one), count it, and send its finish event."""
        if locked:
            self._release(a, reason)
        else:
            with self._lock:
                self._release(a, reason)
        if self.observer is not None:
            now = time.perf_counter()
            n = len(a.stop.generated)
            ttft = None if a.t_first is None else a.t_first - a.t_submit
            tpot = (now - a.t_first) / (n - 1) if a.t_first is not None and n > 1 else None
            try:
                self.observer.request_finished(len(a.ids), n, ttft, tpot, reason)
            except Exception:  # noqa: BLE001 - metrics never break serving
                log.exception("metrics observer failed")
        a.handle.finish_reason = reason
        a.handle.sink(Event("finish", finish_reason=reason, message=message))

    def _release(self, a: _Active, reason: str) -> None:
        if 0 <= a.row < self.max_batch and self._rows[a.row] is a:
            self._rows[a.row] = None
        self._finished[reason] = self._finished.get(reason, 0) + 1
        self._wake.notify_all()

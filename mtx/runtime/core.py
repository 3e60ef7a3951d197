"""The generation core: one KV state of ``max_batch`` rows and a synchronous ``step()``.

Every front end runs on it: ``Generator.generate/stream`` (an offline batch), ``mtx bench`` and the
serving engine (which adds only a thread, an inbox and sinks); ``Session`` and ``Generator.score`` use
its :func:`feed` and the same :class:`~mtx.runtime.row_decoder.RowDecoder` step.

Invariants:
* The state ``backend.new_state(max_batch)`` is allocated once and never reallocated: KV memory is
  ``max_batch x C`` slots per layer whatever the load.
* The scheduler (:mod:`mtx.runtime.scheduler`) decides admission, the calls of a step and finishing;
  the core executes them. A row's tokens depend only on its own request: each request samples with
  its own ``TokenRng`` on the logits of its own row, and rows sharing a call are computed independently
  (bit for bit in float32), so a request's tokens equal those it gets run alone.
* Prompts are fed in canonical chunks (docs/ops.md §1 rule 7), so a row's bits do not depend on the
  load. With a :class:`~mtx.runtime.prefix_cache.PrefixCache`, an admitted request starts from the
  longest cached prefix of its prompt (rule 11; its row seeded with the live positions), and every full
  prompt block it computes is stored for later requests.
* A request with ``speculative`` options verifies prompt-lookup drafts in one call per step when it has
  some (:mod:`mtx.runtime.speculative`, rule 12): its tokens equal plain decoding's.
* A failure is confined: a graph call that raises fails the requests of that call only; a sampling or
  text step that raises fails its request only. Both finish with ``"error"`` (the exception in the
  output, for the front end to raise or log) and the row is freed.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mtx.errors import UsageError
from mtx.runtime import speculative
from mtx.runtime.backends import Backend
from mtx.runtime.prefix_cache import PrefixCache, chain_digests
from mtx.runtime.request import Request
from mtx.runtime.row_decoder import RowDecoder, TokenOutput
from mtx.runtime.scheduler import Phase, RowView, admit, canonical_chunk, defer_decode, plan_step
from mtx.runtime.speculative import NgramProposer, SpeculativeStats


FINISH_REASONS = ("stop", "length", "cancelled", "error")


@dataclass(frozen=True)
class RequestOutput:
    """What one step produced for one request: a ``token`` (None for a finish without a token) with its
    visible ``text`` delta, and ``finish_reason`` (one of FINISH_REASONS) when the request ended in this
    step (``message`` and the exception ``error`` set for ``"error"``); ``logprobs`` of the token when
    its request asks for them (:class:`~mtx.runtime.sampling.TokenLogprobs`)."""

    request_id: int
    token: int | None
    text: str = ""
    finish_reason: str | None = None
    message: str | None = None
    error: BaseException | None = None
    logprobs: Any = None


@dataclass(eq=False)
class _Running:
    """A request in a row. ``fed``: tokens of the row's KV (its next position); ``pending``: the sampled
    token still to feed (DECODE phase)."""

    request: Request
    decoder: RowDecoder
    row: int
    order: int
    fed: int = 0
    pending: int = 0
    digests: list[bytes] | None = None  # prompt block digests, with a prefix cache
    proposer: NgramProposer | None = None  # with speculative options

    @property
    def phase(self) -> Phase:
        return Phase.PREFILL if self.fed < len(self.request.prompt_ids) else Phase.DECODE


def feed(backend: Backend, state: Any, row: int, ids: Sequence[int], start: int, chunk: int,
         want_all: bool, on_chunk: Any = None) -> np.ndarray:
    """Feed ``ids`` to one row from position ``start`` in canonical chunks (ending at multiples of
    ``chunk`` or at the end: docs/ops.md §1 rule 7). ``on_chunk(end)`` is called after each call.

    Returns float32 logits of the last token [V], or of every token [T, V] with ``want_all``.
    """
    backend.check_positions(start + len(ids))
    outs = []
    off = 0
    while off < len(ids):
        n = canonical_chunk(start + off, len(ids) - off, chunk)
        piece = np.asarray([ids[off:off + n]], dtype=np.int64)
        logits = backend.run(state, slice(row, row + 1), piece, np.asarray([start + off], dtype=np.int64),
                             last_only=not want_all)
        outs.append(logits[0])
        off += n
        if on_chunk is not None:
            on_chunk(start + off)
    return np.concatenate(outs, axis=0) if want_all else outs[-1][-1]


def seed_from_cache(cache: PrefixCache, backend: Backend, state: Any, row: int, prompt: Sequence[int],
                    digests: Sequence[bytes]) -> int:
    """Seed ``row`` with the longest cached start of ``prompt`` fed from position 0 (docs/ops.md §1 rule 11).
    Returns the position the row goes on from (0 on a miss)."""
    hit = cache.lookup(prompt, digests)
    if hit is None:
        return 0
    backend.write_positions(state, row, hit.position, hit.first, hit.keys, hit.values)
    return hit.position


def store_prompt_block(cache: PrefixCache, backend: Backend, state: Any, row: int, prompt: Sequence[int],
                       digests: Sequence[bytes], fed: int) -> None:
    """After a canonical chunk of a prompt fed from position 0 ended at ``fed``: store the block that
    ended there, if it is a full block not cached yet (docs/ops.md §1 rule 11)."""
    P = cache.block
    if fed % P or fed == 0 or fed // P > len(digests):
        return
    j = fed // P - 1
    if digests[j] in cache:
        cache.touch(digests[:j + 1])
        return
    keys, values = backend.read_positions(state, row, fed, range(fed - P, fed))
    cache.store(digests[j], j, prompt[fed - P:fed], keys, values, digests[:j])


class BatchCore:
    """Continuous batching over one backend state. Not thread-safe: one thread calls add/abort/step."""

    def __init__(self, backend: Backend, tokenizer: Any | None, max_batch: int, token_budget: int,
                 prefill_chunk: int, max_deferred_tokens: int = 0, prefix_cache: PrefixCache | None = None
                 ) -> None:
        """``max_deferred_tokens``: prompt tokens that may be fed while decode waits
        (:func:`mtx.runtime.scheduler.defer_decode`); 0 never defers decode. ``prefix_cache``: its block
        must be ``prefill_chunk``."""
        for name, value, low in (("max_batch", max_batch, 1), ("token_budget", token_budget, 1),
                                 ("prefill_chunk", prefill_chunk, 1), ("max_deferred_tokens", max_deferred_tokens, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UsageError(f"{name} must be an integer >= {low}, got {value!r}", params=(name,))
        if max_batch > backend.max_batch:
            raise UsageError(f"max_batch {max_batch} exceeds the maximum batch {backend.max_batch} of this export "
                             f"(export again with a larger max_batch)", params=("max_batch",))
        if prefix_cache is not None and prefix_cache.block != prefill_chunk:
            raise UsageError(f"the prefix cache's block {prefix_cache.block} differs from prefill_chunk {prefill_chunk}",
                             params=("prefill_chunk",))
        self.backend = backend
        self.prefix_cache = prefix_cache
        self.spec_stats = SpeculativeStats()
        self.tokenizer = tokenizer
        self.max_batch = max_batch
        self.token_budget = token_budget
        self.prefill_chunk = prefill_chunk
        self.max_deferred_tokens = max_deferred_tokens
        self._deferred = 0  # prompt tokens fed while decode waited, since the last decode
        self.first_call_only = backend.multi_token_batch == "first_call_only"
        self.state = backend.new_state(max_batch)
        self.kv_bytes = backend.state_nbytes(self.state)
        self.rows: list[_Running | None] = [None] * max_batch
        self.waiting: deque[Request] = deque()
        self.steps = 0
        self._aborted: set[int] = set()
        self._order = itertools.count()

    # -- requests ----------------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        """Queue a prepared request; it is admitted into a free row at a later step. A request id already
        in the core is refused (UsageError)."""
        rid = request.request_id
        if any(r.request_id == rid for r in self.waiting) or any(
                a is not None and a.request.request_id == rid for a in self.rows):
            raise UsageError(f"request {rid} is already in this core: prepare a new Request for each run")
        self.waiting.append(request)

    def abort(self, request_id: int) -> None:
        """Cancel a request (waiting or running): it finishes with ``"cancelled"`` at the next step."""
        self._aborted.add(request_id)

    @property
    def running(self) -> int:
        return sum(r is not None for r in self.rows)

    def has_unfinished(self) -> bool:
        return bool(self.waiting) or any(r is not None for r in self.rows)

    # -- the step ----------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Cancel, admit, run one step's calls, sample. Returns the outputs in the order produced."""
        out: list[RequestOutput] = []
        self._cancel(out)
        self._admit(out)
        views = [RowView(Phase.IDLE) if a is None else
                 RowView(a.phase, len(a.request.prompt_ids) - a.fed, a.fed, a.order) for a in self.rows]
        drafts = self._drafts(views)
        for r, d in drafts.items():
            views[r] = RowView(Phase.VERIFY, 0, views[r].position, views[r].order, len(d))
        plan = plan_step(views, self.token_budget, self.prefill_chunk, self.first_call_only, self._deferred,
                         self.max_deferred_tokens)
        if plan.empty:
            return out
        self.steps += 1
        decoding = any(v.phase in (Phase.DECODE, Phase.VERIFY) for v in views)
        fed = sum(call.tokens * (call.rows.stop - call.rows.start) for call in plan.prefill)
        self._deferred = self._deferred + fed if decoding and not (plan.decode_spans or plan.verify) else 0
        for span in plan.decode_spans:
            self._decode(span, out)
        for r in plan.verify:
            self._verify(self.rows[r], drafts[r], out)
        for call in plan.prefill:
            self._prefill(call.rows, call.tokens, out)
        return out

    def _drafts(self, views: list[RowView]) -> dict[int, list[int]]:
        """Draft tokens of the DECODE rows with speculative options, unless decode waits this step."""
        if defer_decode(views, self._deferred, self.max_deferred_tokens):
            return {}
        drafts: dict[int, list[int]] = {}
        for r, a in enumerate(self.rows):
            if a is None or a.proposer is None or views[r].phase is not Phase.DECODE:
                continue
            prop = a.proposer
            try:
                prop.extend(a.decoder.generated[len(prop.context) - len(a.request.prompt_ids):])
                d = prop.propose(a.request.max_new_tokens - len(a.decoder.generated) - 1)
            except Exception:  # noqa: BLE001 - drafting is an optimisation: this row decodes plainly
                a.proposer = None
                continue
            if d:
                drafts[r] = d
        return drafts

    def _cancel(self, out: list[RequestOutput]) -> None:
        if not self._aborted:
            return
        for a in self.rows:
            if a is not None and a.request.request_id in self._aborted:
                self._release(a)
                out.append(RequestOutput(a.request.request_id, None, finish_reason="cancelled"))
        keep: deque[Request] = deque()
        for r in self.waiting:
            if r.request_id in self._aborted:
                out.append(RequestOutput(r.request_id, None, finish_reason="cancelled"))
            else:
                keep.append(r)
        self.waiting = keep
        self._aborted.clear()

    def _admit(self, out: list[RequestOutput]) -> None:
        free = [r for r, a in enumerate(self.rows) if a is None]
        for row in admit(free, len(self.waiting)):
            while self.waiting:
                req = self.waiting.popleft()
                if req.max_new_tokens == 0:  # nothing to generate: no row, no token
                    out.append(RequestOutput(req.request_id, None, finish_reason="length"))
                    continue
                try:
                    decoder = RowDecoder(req, self.tokenizer)
                    a = _Running(req, decoder, row, next(self._order))
                    if req.speculative is not None:  # validated by prepare_request
                        a.proposer = NgramProposer(req.speculative, req.prompt_ids)
                    if self.prefix_cache is not None:
                        a.digests = chain_digests(req.prompt_ids, self.prefix_cache.block)
                        a.fed = seed_from_cache(self.prefix_cache, self.backend, self.state, row, req.prompt_ids,
                                                a.digests)
                except Exception as e:  # noqa: BLE001 - one request's failure is its own
                    out.append(_error(req.request_id, e))
                    continue
                self.rows[row] = a
                break

    def _decode(self, span: slice, out: list[RequestOutput]) -> None:
        """One decode call over ``span``: DECODE rows feed their token, IDLE rows a dummy at position 0."""
        n = span.stop - span.start
        ids = np.zeros((n, 1), dtype=np.int64)
        pos = np.zeros(n, dtype=np.int64)
        members = [(i, a) for i, a in enumerate(self.rows[span]) if a is not None]
        for i, a in members:
            ids[i, 0], pos[i] = a.pending, a.fed
        logits = self._run(span, ids, pos, [a for _, a in members], out)
        if logits is None:
            return
        for i, a in members:
            if self.rows[a.row] is a:  # not failed alone in a retry
                a.fed += 1
                self._sample(a, logits[i, -1], out)

    def _prefill(self, rows: slice, n: int, out: list[RequestOutput]) -> None:
        members = [a for a in self.rows[rows] if a is not None]
        ids = np.asarray([a.request.prompt_ids[a.fed:a.fed + n] for a in members], dtype=np.int64)
        pos = np.asarray([a.fed for a in members], dtype=np.int64)
        logits = self._run(rows, ids, pos, members, out)
        if logits is None:
            return
        for i, a in enumerate(members):
            if self.rows[a.row] is not a:  # failed alone in a retry
                continue
            a.fed += n
            if self.prefix_cache is not None and a.digests is not None:
                try:
                    store_prompt_block(self.prefix_cache, self.backend, self.state, a.row, a.request.prompt_ids,
                                       a.digests, a.fed)
                except Exception:  # noqa: BLE001 - caching is an optimisation: this prompt is simply not stored
                    a.digests = None
            if a.fed == len(a.request.prompt_ids):
                self._sample(a, logits[i, -1], out)

    def _verify(self, a: _Running, drafts: list[int], out: list[RequestOutput]) -> None:
        """One verification call for ``a``: its pending token and ``drafts`` (docs/ops.md §1 rule 12)."""
        try:
            v = speculative.verify(self.backend, self.state, a.row, a.fed, a.pending, drafts)
        except Exception as e:  # noqa: BLE001 - a failed call fails its own request
            self._release(a)
            out.append(_error(a.request.request_id, e))
            return

        def sample(logits: np.ndarray) -> tuple[int, bool]:
            res = self._sample(a, logits, out)
            return (res.token, res.finish_reason is not None) if res is not None else (-1, True)

        accepted = speculative.accept(v, drafts, sample)
        self.spec_stats.verifications += 1
        self.spec_stats.drafted += len(drafts)
        self.spec_stats.accepted += accepted
        if self.rows[a.row] is not a:  # finished (or failed) within the drafts
            return
        assert a.proposer is not None
        a.proposer.record(accepted)
        try:
            speculative.rollback(self.backend, self.state, a.row, v, accepted)
        except Exception as e:  # noqa: BLE001
            self._release(a)
            out.append(_error(a.request.request_id, e))
            return
        a.fed = v.start + accepted + 1

    def _run(self, rows: slice, ids: np.ndarray, pos: np.ndarray, members: list[_Running],
             out: list[RequestOutput]) -> np.ndarray | None:
        """One graph call over ``rows``. If it fails and the backend's calls can be rerun
        (``Backend.rerun_safe``: a call writes only its own positions' slots), each member row is retried
        alone; rows that fail alone finish with ``"error"`` and their logits are NaN. Otherwise every
        member of the call finishes with ``"error"``. None if every member failed."""
        try:
            return self.backend.run(self.state, rows, ids, pos, last_only=True)
        except Exception as e:  # noqa: BLE001 - a failed call fails its own requests, not the core
            if len(members) == 1 or rows.stop - rows.start == 1 or not self.backend.rerun_safe:
                for a in members:
                    self._release(a)
                    out.append(_error(a.request.request_id, e))
                return None
        parts: list[np.ndarray | None] = []
        for i, r in enumerate(range(rows.start, rows.stop)):
            a = self.rows[r]
            if a is None or not any(a is m for m in members):  # an idle row of a decode span: nothing to retry
                parts.append(None)
                continue
            parts.append(self._run(slice(r, r + 1), ids[i:i + 1], pos[i:i + 1], [a], out))
        if all(p is None for p in parts):
            return None
        shape = next(p for p in parts if p is not None).shape[1:]
        return np.concatenate([p if p is not None else np.full((1, *shape), np.nan, np.float32) for p in parts])

    def _sample(self, a: _Running, logits: np.ndarray, out: list[RequestOutput]) -> TokenOutput | None:
        """The request's sampling step on ``logits`` [V]; None if it failed (the request ends with "error")."""
        try:
            res = a.decoder.step(logits)
        except Exception as e:  # noqa: BLE001 - one request's failure is its own
            self._release(a)
            out.append(_error(a.request.request_id, e))
            return None
        out.append(RequestOutput(a.request.request_id, res.token, res.text, res.finish_reason,
                                 logprobs=res.logprobs))
        if res.finish_reason is not None:
            self._release(a)
        else:
            a.pending = res.token
        return res

    def _release(self, a: _Running) -> None:
        if self.rows[a.row] is a:
            self.rows[a.row] = None


def _error(request_id: int, e: BaseException) -> RequestOutput:
    return RequestOutput(request_id, None, finish_reason="error", message=f"{type(e).__name__}: {e}", error=e)

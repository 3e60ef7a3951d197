"""Window and slot arithmetic of the rolling KV buffer: the one place it is written down.

Every part of mtx (reference op, exporter function bodies, runtime, kernels' tests) uses these
definitions; docs/ops.md states them normatively.

* Capacity ``C`` slots per layer and batch row; the key/value of absolute position ``p`` lives in
  slot ``p mod C``.
* A call brings a chunk of ``S`` tokens at positions ``start .. start+S-1`` (``start`` per row).
  Before the call the buffer holds, in slot ``s``, the latest position ``q < start`` with
  ``q = s (mod C)``, if ``q >= 0``; i.e. positions ``max(0, start-C) .. start-1``.
* Effective window ``W = window`` if ``window > 0`` else ``C`` (full attention, valid while
  ``start + S <= C``). A query at ``p`` sees keys at ``k`` with ``p - W < k <= p``.
* The chunk is written *after* attention: its last ``min(S, C)`` tokens go to their slots.

Per-layer windows (Ministral): each layer has its own window and capacity, :class:`KVPlan`
(:func:`plan_kv` sizes them); every rule above holds per layer.

Importing this module does not import torch (the ONNX Runtime path uses the integer rules only); the
tensor helpers import it when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from mtx.errors import UsageError

if TYPE_CHECKING:
    import torch


def effective_window(window: int | None, capacity: int) -> int:
    """W used by the op: the sliding window, or the capacity for full attention (window None/0).

    Raises UsageError unless ``capacity >= W``: the capacity rule.
    """
    if capacity <= 0:
        raise UsageError(f"cache_capacity must be positive, got {capacity}", params=("cache_capacity",))
    if not window:
        return capacity
    if capacity < window:
        raise UsageError(f"cache_capacity {capacity} is smaller than the sliding window {window}; "
                         f"need a capacity >= the window", params=("cache_capacity",))
    return window


def capacity_for(window: int | None, max_positions: int, requested: int | None = None) -> int:
    """The KV capacity C: ``requested``, or by default the window (full attention: ``max_positions``,
    the model's maximum context); checked against the capacity rule C >= W."""
    capacity = requested if requested is not None else (window or max_positions)
    effective_window(window, capacity)
    return capacity


@dataclass(frozen=True)
class KVPlan:
    """Window and capacity of each layer's buffers (docs/ops.md §1 "Per-layer windows").

    ``windows[l]`` is layer ``l``'s op attribute (0: full attention), ``capacities[l]`` its ``C_l``;
    invariant: ``C_l >= W_l`` for every layer. ``layouts`` are the manifest's per-layer ``kv`` layouts
    where known (``ring`` by default).
    """

    windows: tuple[int, ...]
    capacities: tuple[int, ...]
    layouts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if len(self.windows) != len(self.capacities) or not self.windows:
            raise ValueError("KVPlan: one window and one capacity per layer")
        for w, c in zip(self.windows, self.capacities):
            effective_window(w, c)
        if not self.layouts:
            object.__setattr__(self, "layouts", ("ring",) * len(self.windows))

    @property
    def uniform(self) -> bool:
        """Every layer has the same window, capacity and layout."""
        return len(set(zip(self.windows, self.capacities, self.layouts))) == 1

    @property
    def window(self) -> int | None:
        """The window of every layer (None: full attention); raises for a per-layer plan (rules 10-12 and
        prefix state files are defined for one window)."""
        return self._one().windows[0] or None

    @property
    def capacity(self) -> int:
        """The capacity of every layer; raises for a per-layer plan."""
        return self._one().capacities[0]

    @property
    def layout(self) -> str:
        return self._one().layouts[0]

    def _one(self) -> KVPlan:
        if not self.uniform:
            raise UsageError(f"this model's layers differ in KV window or capacity (windows {list(self.windows)}); "
                             f"prefix caching, prefix state files and speculative decoding need one window for "
                             f"every layer", params=("window",))
        return self

    def effective(self, layer: int) -> int:
        """W of ``layer`` (its capacity under full attention)."""
        return effective_window(self.windows[layer], self.capacities[layer])

    def context_limit(self, max_position: int | None) -> int | None:
        """Positions a row may reach: the smallest capacity of a full-attention layer (rule 8) and
        ``max_position``; None where unbounded."""
        limits = [c for w, c in zip(self.windows, self.capacities) if not w]
        limits += [max_position] if max_position else []
        return min(limits) if limits else None

    def check_context(self, end_pos: int) -> None:
        """UsageError if ``end_pos`` positions exceed a full-attention layer's capacity (rule 8)."""
        for w, c in zip(self.windows, self.capacities):
            check_full_attention_context(end_pos, w, c)

    def row_elements(self, kv_heads: int, head_dim: int) -> int:
        """Elements of one batch row's keys and values over all layers."""
        return 2 * kv_heads * head_dim * sum(self.capacities)


def plan_kv(windows: Sequence[int], max_positions: int, requested: int | None = None) -> KVPlan:
    """The KV plan of a model whose layers have ``windows`` (0: full attention), docs/ops.md §1.

    One window for every layer: every layer gets :func:`capacity_for` (the requested capacity, or the
    window, or ``max_positions`` under full attention). Per-layer windows: ``C = requested`` (default
    ``max_positions``) bounds the context; a layer with ``0 < W_l < C`` keeps its window with ``C_l = W_l``,
    every other layer is full attention (window 0) with ``C_l = C`` — the same attention while positions
    stay below ``C``, which the full layers enforce (rule 8).
    """
    windows = tuple(int(w or 0) for w in windows)
    if len(set(windows)) == 1:
        cap = capacity_for(windows[0] or None, max_positions, requested)
        return KVPlan(windows, (cap,) * len(windows))
    cap = requested if requested is not None else max_positions
    effective_window(None, cap)
    sliding = [0 < w < cap for w in windows]
    return KVPlan(tuple(w if s else 0 for w, s in zip(windows, sliding)),
                  tuple(w if s else cap for w, s in zip(windows, sliding)))


def slot_of(pos: torch.Tensor, capacity: int) -> torch.Tensor:
    """Slot index of absolute positions (any int tensor)."""
    import torch

    return torch.remainder(pos, capacity)


def chunk_positions(start_pos: torch.Tensor, length: int) -> torch.Tensor:
    """Absolute positions [B, S] of a chunk starting at ``start_pos`` [B] (int64)."""
    import torch

    return start_pos[:, None] + torch.arange(length, device=start_pos.device, dtype=start_pos.dtype)


def resident_positions(start_pos: torch.Tensor, capacity: int) -> torch.Tensor:
    """Absolute position [B, C] held by each slot before a call at ``start_pos``; -1 where empty.

    Slot s holds the latest q < start with q = s (mod C): q = start-1 - ((start-1-s) mod C).
    """
    import torch

    slots = torch.arange(capacity, device=start_pos.device, dtype=start_pos.dtype)
    last = start_pos[:, None] - 1
    held = last - torch.remainder(last - slots, capacity)
    return torch.where(held >= 0, held, torch.full_like(held, -1))


def visible(query_pos: torch.Tensor, key_pos: torch.Tensor, window: int) -> torch.Tensor:
    """Boolean mask [..., Sq, Sk]: key at k is visible to query at p iff k >= 0 and p - W < k <= p."""
    p = query_pos[..., :, None]
    k = key_pos[..., None, :]
    return (k >= 0) & (k <= p) & (p - k < window)


def written_tokens(length: int, capacity: int) -> slice:
    """Which chunk tokens are written to the buffer: the last min(S, C) (earlier ones are overwritten in-call)."""
    return slice(max(0, length - capacity), length)


def context_limit(window: int | None, capacity: int, max_position: int | None) -> int | None:
    """Positions a row may reach (prompt + generated): the capacity under full attention (rule 8) and the
    export's max_position (its RoPE tables); None where unbounded."""
    limits = [n for n in (None if window else capacity, max_position) if n]
    return min(limits) if limits else None


def check_full_attention_context(end_pos: int, window: int | None, capacity: int) -> None:
    """Full attention is exact only while every position fits: raise if ``end_pos`` exceeds capacity."""
    if not window and end_pos > capacity:
        raise UsageError(
            f"context of {end_pos} tokens exceeds the KV capacity {capacity} of this full-attention model; "
            f"export it with a larger cache_capacity", params=("cache_capacity",))


# -- live positions, seeding and rollback (docs/ops.md §1 rules 10-12) -----------------------------

LAYOUTS = ("ring", "ort_window")


def live_positions(at: int, window: int | None, capacity: int) -> range:
    """Positions whose keys a row about to be fed at ``at`` may still read: ``[max(0, at - W), at)``."""
    return range(max(0, at - effective_window(window, capacity)), at)


def ort_window_fill(at: int, window: int | None, capacity: int) -> int:
    """Rows of ONNX Runtime's windowed cache in use when a row is at ``at``: ``at`` while it fits, then
    (once a call overflows the capacity, ORT shifts the rows so that the last W remain and fills up again)
    ``W + (at - C - 1) mod (C - W + 1)``. A function of ``at`` alone: measured on ORT 1.32 for every chunk
    size up to W, and checked by the prefix-cache and speculative tests on every capacity they use."""
    if at <= capacity:
        return at
    W = effective_window(window, capacity)
    return W + (at - capacity - 1) % (capacity - W + 1)


def slot_at(layout: str, position: int, at: int, window: int | None, capacity: int) -> int:
    """Where the key of ``position`` (held at ``at``) sits in a row's buffers when the row is at ``at``.

    ``ring``: slot ``position mod C``. ``ort_window`` (ONNX Runtime's windowed cache): rows ``[0, n)``
    hold positions ``at - n .. at - 1`` in order, ``n`` = :func:`ort_window_fill`.
    """
    if layout == "ring":
        return position % capacity
    if layout == "ort_window":
        return position - (at - ort_window_fill(at, window, capacity))
    raise ValueError(f"unknown KV layout {layout!r}")


def slots_at(layout: str, positions: range, at: int, window: int | None, capacity: int) -> list[int]:
    """:func:`slot_at` of each of ``positions`` (all held at ``at``)."""
    return [slot_at(layout, q, at, window, capacity) for q in positions]


def held_positions(layout: str, at: int, window: int | None, capacity: int) -> range:
    """Positions whose keys a row at ``at`` still holds (a superset of the live ones): ``ring`` the last C,
    ``ort_window`` the last :func:`ort_window_fill`."""
    if layout == "ring":
        return range(max(0, at - capacity), at)
    return range(at - ort_window_fill(at, window, capacity), at)


def max_draft_tokens(window: int | None, capacity: int) -> int:
    """The most draft tokens one verification call may carry: ``W - 1`` (rule 12)."""
    return effective_window(window, capacity) - 1


def verify_saves(layout: str, start: int, drafts: int, window: int | None, capacity: int) -> range:
    """Positions to save before a verification call at ``start`` with ``drafts`` draft tokens: those live
    after the least acceptance (at ``start + 1``) that the call may overwrite or drop (rule 12). Empty on
    ``ring`` when ``C >= W + drafts``."""
    end = start + drafts + 1
    need = live_positions(start + 1, window, capacity)
    kept = held_positions(layout, end, window, capacity)
    return range(need.start, max(need.start, min(kept.start, start)))


def rollback_moves(layout: str, start: int, drafts: int, accepted: int, window: int | None, capacity: int
                   ) -> tuple[range, range]:
    """After a verification call at ``start`` with ``drafts`` drafts of which ``accepted`` were taken,
    what makes the row's state the one at ``start + accepted + 1`` (rule 12).

    Returns ``(restore, relocate)``: live positions to write back from the saved ones
    (:func:`verify_saves`), and live positions to copy from where the call's layout left them to where
    the new position's layout wants them (empty on ``ring``, and on ``ort_window`` until the call passed
    the capacity). Both empty when every draft was accepted.
    """
    end = start + drafts + 1
    new = start + accepted + 1
    if accepted == drafts:
        return range(0), range(0)
    need = live_positions(new, window, capacity)
    kept = held_positions(layout, end, window, capacity)
    restore = range(need.start, max(need.start, min(kept.start, need.stop)))
    moved = range(restore.stop, need.stop)
    if layout == "ring" or end - ort_window_fill(end, window, capacity) == new - ort_window_fill(new, window, capacity):
        moved = range(0)  # every kept position is already where the new position's layout wants it
    return restore, moved

"""Automatic prefix caching: prompt KV blocks kept across requests (docs/ops.md §1 rule 11).

A prompt's keys and values are cached in blocks of ``P`` positions ``[jP, (j+1)P)`` (``P`` the
prefill block, so every block is one canonical chunk), each named by a chain digest of all token ids up
to its end. A later prompt starting with the same ids starts at the largest block boundary
``p <= len(prompt) - 1`` for which every block meeting ``live(p)`` (:func:`mtx.rolling_kv.live_positions`)
is cached: its row is seeded with those positions and fed from ``p``. The row's keys, values and logits
then equal those of the prompt prefilled from position 0, bit for bit.

Memory is bounded by ``capacity_bytes`` (least recently used blocks are evicted first). Blocks are
copies: a row seeded from a block never shares memory with the cache, so eviction never changes a
running request. Thread-safe.
"""

from __future__ import annotations

import hashlib
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mtx import rolling_kv
from mtx.errors import UsageError
from mtx.runtime.prefix_state import PrefixState

#: Default bound of the prefix cache (``mtx.load(prefix_cache_bytes=...)``, ``mtx serve --prefix-cache-bytes``).
DEFAULT_PREFIX_CACHE_BYTES = 512 << 20


@dataclass(frozen=True)
class Block:
    """Keys and values [L, Hkv, P, D] of positions ``[index*P, (index+1)*P)``."""

    index: int
    tokens: tuple[int, ...]
    keys: np.ndarray
    values: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.keys.nbytes + self.values.nbytes)


@dataclass
class PrefixCacheStats:
    """Counters since the cache was made: requests that found a prefix (``hits``) or none (``misses``),
    prompt tokens not computed thanks to it, blocks stored and evicted, and the bytes held now."""

    hits: int = 0
    misses: int = 0
    tokens_reused: int = 0
    blocks_stored: int = 0
    blocks_evicted: int = 0
    bytes: int = 0
    blocks: int = 0


def chain_digests(ids: Sequence[int], block: int) -> list[bytes]:
    """Digest of each full block of ``ids``: block j's covers every id up to its end (a chain)."""
    out: list[bytes] = []
    prev = b""
    arr = np.asarray(ids, dtype=np.int64)
    for j in range(len(arr) // block):
        prev = hashlib.blake2b(prev + arr[j * block:(j + 1) * block].tobytes(), digest_size=16).digest()
        out.append(prev)
    return out


class PrefixCache:
    """LRU cache of prompt blocks of ``block`` positions for a model of ``window``/``capacity``."""

    def __init__(self, capacity_bytes: int, block: int, window: int | None, capacity: int) -> None:
        if isinstance(capacity_bytes, bool) or not isinstance(capacity_bytes, int) or capacity_bytes < 0:
            raise UsageError(f"prefix_cache_bytes must be an integer >= 0, got {capacity_bytes!r}",
                             params=("prefix_cache_bytes",))
        W = rolling_kv.effective_window(window, capacity)
        if block > W:
            raise UsageError(f"prefix caching needs a prefill chunk no longer than the window ({W}); "
                             f"got prefill_chunk {block} (docs/ops.md §1 rule 11)", params=("prefill_chunk",))
        self.capacity_bytes = capacity_bytes
        self.block = block
        self.window = window
        self.capacity = capacity
        self._blocks: OrderedDict[bytes, Block] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = PrefixCacheStats()

    def __contains__(self, digest: bytes) -> bool:
        with self._lock:
            return digest in self._blocks

    def lookup(self, ids: Sequence[int], digests: Sequence[bytes] | None = None) -> PrefixState | None:
        """The longest cached start for a prompt of ``ids`` (at most ``len(ids) - 1`` positions), as the
        live positions to seed a row with; None (a miss) if no block boundary qualifies."""
        digests = chain_digests(ids, self.block) if digests is None else digests
        P = self.block
        with self._lock:
            for b in range(min(len(digests), (len(ids) - 1) // P), 0, -1):
                p = b * P
                live = rolling_kv.live_positions(p, self.window, self.capacity)
                needed = range(live.start // P, b)
                blocks = [self._blocks.get(digests[j]) for j in needed]
                if any(blk is None for blk in blocks):
                    continue
                for j in reversed(needed):  # the chain's head most recent: tails are evicted first
                    self._blocks.move_to_end(digests[j])
                lo = live.start - needed.start * P
                keys = np.concatenate([blk.keys for blk in blocks], axis=2)[:, :, lo:]
                values = np.concatenate([blk.values for blk in blocks], axis=2)[:, :, lo:]
                self.stats.hits += 1
                self.stats.tokens_reused += p
                return PrefixState(tuple(int(t) for t in ids[:p]), live.start, keys, values)
            self.stats.misses += 1
            return None

    def store(self, digest: bytes, index: int, tokens: Sequence[int], keys: np.ndarray, values: np.ndarray,
              earlier: Sequence[bytes] = ()) -> None:
        """Keep block ``index`` (keys/values [L, Hkv, P, D], copied) under ``digest``, evicting the least
        recently used blocks beyond ``capacity_bytes``. ``earlier``: the digests of the blocks before it in
        its chain, touched after it so a chain loses its tail before its head (a hit at p <= W needs every
        block from 0). A block larger than the whole cache is not kept."""
        blk = Block(index, tuple(int(t) for t in tokens), np.array(keys), np.array(values))
        with self._lock:
            if digest not in self._blocks and blk.nbytes <= self.capacity_bytes:
                self._blocks[digest] = blk
                self.stats.bytes += blk.nbytes
                self.stats.blocks_stored += 1
            if digest in self._blocks:
                self._blocks.move_to_end(digest)
            for d in reversed(earlier):
                if d in self._blocks:
                    self._blocks.move_to_end(d)
            self._evict()

    def touch(self, chain: Sequence[bytes]) -> None:
        """Mark the cached blocks of ``chain`` (digests in chain order) as just used, the head last."""
        with self._lock:
            for d in reversed(chain):
                if d in self._blocks:
                    self._blocks.move_to_end(d)

    def _evict(self) -> None:
        """Drop least recently used blocks until the bound holds (lock held)."""
        while self.stats.bytes > self.capacity_bytes:
            _, old = self._blocks.popitem(last=False)
            self.stats.bytes -= old.nbytes
            self.stats.blocks_evicted += 1
        self.stats.blocks = len(self._blocks)

    def clear(self) -> None:
        with self._lock:
            self._blocks.clear()
            self.stats.bytes = 0
            self.stats.blocks = 0

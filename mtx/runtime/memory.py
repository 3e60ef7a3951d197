"""Memory of a process by one rule, the same for mtx and its peers (README, "Memory"):

    memory = anonymous resident bytes (RssAnon) + bytes of the weight files the process has mapped

taken together at each sample, and reported at its peak. Mapped weight files count whole, resident or
not: this machine's kernel pages cold file-backed pages out (DAMON ``pageout``), so resident file pages
understate what a process reads, while anonymous pages are never paged out without swap. A weight file
that is read into anonymous memory and not kept mapped counts once, as anonymous bytes.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import psutil


@dataclass(frozen=True)
class MemorySample:
    """One reading of a process, all in bytes."""

    anon: int  # RssAnon: resident anonymous pages (heap, arenas, prepacked weights, KV)
    mapped_weights: int  # the summed sizes of the mappings of weight files, resident or not
    rss: int  # VmRSS, for reference: page-out makes it understate file-backed pages

    @property
    def total(self) -> int:
        return self.anon + self.mapped_weights


def _under(path: str, roots: Sequence[Path]) -> bool:
    return any(path == str(r) or path.startswith(str(r) + os.sep) for r in roots)


def _status_bytes(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                out[key] = int(rest.split()[0]) * 1024  # kB
    return out


def sample(pid: int, weight_roots: Sequence[Path | str]) -> MemorySample:
    """A reading of process ``pid`` from /proc (maps and status, not smaps: cheap enough to sample during a
    timed run); a mapping is a weight file's when its path is one of ``weight_roots`` or lies under one of
    them (folders). Overlapping mappings of one file are counted once."""
    roots = [Path(r).resolve() for r in weight_roots]
    ranges: dict[str, list[tuple[int, int]]] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    path = parts[5].rstrip("\n")
                    if _under(path, roots):
                        start, end = (int(x, 16) for x in parts[0].split("-"))
                        ranges.setdefault(path, []).append((start, end))
        status = _status_bytes(pid)
    except (FileNotFoundError, ProcessLookupError) as e:
        raise psutil.NoSuchProcess(pid) from e
    mapped = 0
    for spans in ranges.values():
        reach = 0
        for start, end in sorted(spans):
            start = max(start, reach)
            if end > start:
                mapped += end - start
                reach = end
    return MemorySample(anon=status.get("RssAnon", 0), mapped_weights=mapped, rss=status.get("VmRSS", 0))


@dataclass
class MemoryPeak:
    """The sample with the largest :attr:`MemorySample.total` seen, and how many samples were taken."""

    peak: MemorySample | None = None
    samples: int = 0

    def add(self, s: MemorySample) -> None:
        self.samples += 1
        if self.peak is None or s.total > self.peak.total:
            self.peak = s

    def report(self) -> dict[str, float | int]:
        """The peak in MiB, with its parts: what benchmarks print."""
        p = self.peak or MemorySample(0, 0, 0)
        mib = 2**20
        return {"memory_mb": round(p.total / mib, 1), "anon_mb": round(p.anon / mib, 1),
                "mapped_weights_mb": round(p.mapped_weights / mib, 1), "rss_mb": round(p.rss / mib, 1),
                "samples": self.samples}


@dataclass
class MemorySampler:
    """Samples a process (this one by default) every ``interval_s`` on a daemon thread, from ``start()``
    to ``stop()``; the peak by the rule is in :attr:`result`. Use it as a context manager."""

    weight_roots: Sequence[Path | str]
    pid: int = field(default_factory=os.getpid)
    interval_s: float = 0.05
    result: MemoryPeak = field(default_factory=MemoryPeak)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.take()
            self._stop.wait(self.interval_s)

    def take(self) -> None:
        """One sample now (also called at the ends of phases, so short phases are not missed)."""
        try:
            self.result.add(sample(self.pid, self.weight_roots))
        except psutil.NoSuchProcess:
            self._stop.set()

    def start(self) -> "MemorySampler":
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mtx-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> MemoryPeak:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return self.result

    def __enter__(self) -> "MemorySampler":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_sampling(proc: "psutil.Popen | psutil.Process", weight_roots: Sequence[Path | str],
                  interval_s: float = 0.02) -> MemoryPeak:
    """Samples a child process until it exits; returns the peak by the rule."""
    peak = MemoryPeak()
    while proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
        try:
            peak.add(sample(proc.pid, weight_roots))
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            break
        time.sleep(interval_s)
    return peak


def export_weight_roots(root: Path | str) -> list[Path]:
    """The paths whose mappings count as an export's weights: its folder, and the targets of the files
    in it that are symlinks out of it (external data linked from a checkpoint)."""
    root = Path(root).resolve()
    return [root, *sorted({p.resolve() for p in root.iterdir() if p.is_symlink()})]


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter (malloc.h)
HEAP_MMAP_THRESHOLD = 1 << 20


def keep_freed_buffers_unmapped(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more with their own mappings, returned to the
    system when freed. By default glibc raises that threshold as large blocks are freed (up to 32 MiB), so
    the tensors ONNX Runtime frees while it loads a model (initializers replaced by their constant-folded or
    prepacked forms) stay resident in the heap as holes: ~80 MiB on the 125M float32 export, a second
    copy of some weights. Fixing the threshold (which also stops the raising) removes them. Process-wide;
    a no-op returning False off glibc."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))

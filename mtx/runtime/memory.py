"""Memory of a process by one rule, the same for mtx and its peers (README, "Memory: one rule"):

    memory = anonymous resident bytes (RssAnon) + bytes of the weight files the process has mapped

taken together at each sample, and reported at its peak. Mapped weight files count whole, resident or
not: this machine's kernel pages cold file-backed pages out (DAMON ``pageout``), so resident file pages
understate what a process reads, while anonymous pages are never paged out without swap. A byte of a
file counts once however many mappings cover it (the union of the mapped file ranges). A weight file
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
    mapped_weights: int  # bytes of weight files covered by the process's mappings, resident or not
    rss: int  # VmRSS, for reference: page-out makes it understate file-backed pages

    @property
    def total(self) -> int:
        return self.anon + self.mapped_weights


def _under(path: str, roots: Sequence[str]) -> bool:
    return any(path == r or path.startswith(r + os.sep) for r in roots)


def _status_bytes(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("RssAnon", "VmRSS"):
                out[key] = int(rest.split()[0]) * 1024  # kB
    return out


def resolve_roots(weight_roots: Sequence[Path | str]) -> list[str]:
    """The roots as the resolved path strings /proc/PID/maps names files by."""
    return [str(Path(r).resolve()) for r in weight_roots]


def sample(pid: int, roots: Sequence[str]) -> MemorySample:
    """A reading of process ``pid`` from /proc (maps and status, not smaps: cheap enough to sample during a
    timed run). A mapping is a weight file's when its path is one of ``roots`` (from :func:`resolve_roots`)
    or lies under one of them (folders); each file counts the union of its mapped byte ranges (maps' offset
    column), so a file never counts more than its size. Raises psutil.NoSuchProcess / AccessDenied."""
    ranges: dict[str, list[tuple[int, int]]] = {}
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(maxsplit=5)
                if len(parts) == 6:
                    path = parts[5].rstrip("\n")
                    if _under(path, roots):
                        start, end = (int(x, 16) for x in parts[0].split("-"))
                        offset = int(parts[2], 16)
                        ranges.setdefault(path, []).append((offset, offset + end - start))
        status = _status_bytes(pid)
    except (FileNotFoundError, ProcessLookupError) as e:
        raise psutil.NoSuchProcess(pid) from e
    except PermissionError as e:
        raise psutil.AccessDenied(pid) from e
    mapped = 0
    for spans in ranges.values():
        reach = 0
        for lo, hi in sorted(spans):
            lo = max(lo, reach)
            if hi > lo:
                mapped += hi - lo
            reach = max(reach, hi)
    return MemorySample(anon=status.get("RssAnon", 0), mapped_weights=mapped, rss=status.get("VmRSS", 0))


@dataclass
class MemoryPeak:
    """The sample with the largest :attr:`MemorySample.total` seen, and how many samples were taken
    (thread-safe: a sampler thread and the timed thread both add)."""

    peak: MemorySample | None = None
    samples: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def add(self, s: MemorySample) -> None:
        with self._lock:
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
    to ``stop()``; the peak by the rule is in :attr:`result`. Use it as a context manager. In-process
    sampling reads /proc/self/maps under the GIL every interval: a few tens of microseconds."""

    weight_roots: Sequence[Path | str]
    pid: int = field(default_factory=os.getpid)
    interval_s: float = 0.05
    result: MemoryPeak = field(default_factory=MemoryPeak)
    _roots: list[str] = field(init=False, repr=False)
    _stop: threading.Event = field(default_factory=threading.Event, init=False, repr=False)
    _thread: threading.Thread | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._roots = resolve_roots(self.weight_roots)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.take()
            self._stop.wait(self.interval_s)

    def take(self) -> None:
        """One sample now (also called at the ends of phases, so short phases are not missed)."""
        try:
            self.result.add(sample(self.pid, self._roots))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
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
    """Samples a child process until it exits (or can no longer be read); returns the peak by the rule."""
    roots = resolve_roots(weight_roots)
    peak = MemoryPeak()
    while True:
        try:
            if not proc.is_running() or proc.status() == psutil.STATUS_ZOMBIE:
                break
            peak.add(sample(proc.pid, roots))
        except (psutil.NoSuchProcess, psutil.ZombieProcess, psutil.AccessDenied):
            break
        time.sleep(interval_s)
    return peak


def export_weight_roots(root: Path | str) -> list[Path]:
    """The paths whose mappings count as an export's weights: its folder, and the targets of the files
    in it that are symlinks out of it (external data linked from a checkpoint)."""
    root = Path(root).resolve()
    return [root, *sorted({p.resolve() for p in root.iterdir() if p.is_symlink()})]


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number (malloc.h); glibc only
HEAP_MMAP_THRESHOLD = 1 << 20


def keep_freed_buffers_unmapped(threshold: int = HEAP_MMAP_THRESHOLD) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes or more with their own mappings, returned to the
    system when freed. By default glibc raises that threshold as large blocks are freed (up to 32 MiB), so
    the tensors ONNX Runtime frees while it loads a model (initializers replaced by their constant-folded or
    prepacked forms) stay resident in the heap as holes: ~80 MiB on the 125M float32 export, a second
    copy of some weights. Fixing the threshold (which also stops the raising) removes them.

    Process-wide and lasting: every later allocation of the host process of ``threshold`` bytes or more
    gets its own mapping (an mmap/munmap each). Returns False, changing nothing, off glibc."""
    try:  # "glibc 2.36"; cheap, unlike platform.libc_ver(), which reads the interpreter's binary
        libc = os.confstr("CS_GNU_LIBC_VERSION") or ""
    except (ValueError, OSError, AttributeError):
        libc = ""
    if not libc.startswith("glibc"):
        return False
    import ctypes

    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own libc
    except (OSError, AttributeError):
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))

"""Memory by one rule (mtx.runtime.memory): anonymous resident bytes + the mapped bytes of weight files.

References are independent of the code under test: a file mapped with Python's ``mmap`` (its size is
known), numpy buffers whose pages are touched, and the kernel's own ``/proc/self/status`` read in a child.
"""

from __future__ import annotations

import json
import mmap
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

import platform

import pytest

from mtx.runtime.memory import MemorySampler, export_weight_roots, resolve_roots, sample

MiB = 2**20


def test_mapped_weight_files_count_whole_resident_or_not(tmp_path: Path):
    weights = tmp_path / "export" / "model.onnx.data"
    weights.parent.mkdir()
    other = tmp_path / "other.bin"
    for path, size in ((weights, 24 * MiB), (other, 8 * MiB)):
        with open(path, "wb") as f:
            f.truncate(size)
    with open(weights, "rb") as fw, open(other, "rb") as fo:
        whole = mmap.mmap(fw.fileno(), 0, prot=mmap.PROT_READ)
        again = mmap.mmap(fw.fileno(), 0, prot=mmap.PROT_READ)  # a second mapping of the same file
        unrelated = mmap.mmap(fo.fileno(), 0, prot=mmap.PROT_READ)
        try:
            s = sample(os.getpid(), resolve_roots(export_weight_roots(weights.parent)))
            # none of the pages was touched: nothing resident, yet the file counts whole, and once
            assert s.mapped_weights == 24 * MiB
            assert sample(os.getpid(), resolve_roots([weights])).mapped_weights == 24 * MiB
            assert sample(os.getpid(), resolve_roots([tmp_path])).mapped_weights == 32 * MiB
            assert sample(os.getpid(), resolve_roots([tmp_path / "nowhere"])).mapped_weights == 0
        finally:
            whole.close(), again.close(), unrelated.close()
        # two windows of the file, 4 MiB apart with 8 MiB each: their union is 12 MiB
        first = mmap.mmap(fw.fileno(), 8 * MiB, prot=mmap.PROT_READ, offset=0)
        second = mmap.mmap(fw.fileno(), 8 * MiB, prot=mmap.PROT_READ, offset=4 * MiB)
        try:
            assert sample(os.getpid(), resolve_roots([weights])).mapped_weights == 12 * MiB
        finally:
            first.close(), second.close()
    assert sample(os.getpid(), resolve_roots([weights])).mapped_weights == 0


def test_symlinked_external_data_counts_as_the_exports(tmp_path: Path):
    data = tmp_path / "ckpt" / "w.bin"
    data.parent.mkdir()
    data.write_bytes(b"\0" * (4 * MiB))
    export = tmp_path / "export"
    export.mkdir()
    (export / "w.bin").symlink_to(data)
    with open(export / "w.bin", "rb") as f, mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as m:
        assert m[0] == 0
        assert sample(os.getpid(), resolve_roots(export_weight_roots(export))).mapped_weights == 4 * MiB


def test_anonymous_bytes_follow_touched_buffers():
    before = sample(os.getpid(), []).anon
    buf = np.ones(64 * MiB // 8)  # pages written: resident anonymous memory
    during = sample(os.getpid(), []).anon
    del buf
    after = sample(os.getpid(), []).anon
    assert during - before >= 60 * MiB
    assert during - after >= 60 * MiB  # a large numpy buffer is its own mapping, returned when freed


def test_sampler_thread_keeps_the_peak():
    base = sample(os.getpid(), []).anon
    with MemorySampler([], interval_s=0.01) as sampler:  # no explicit take(): only the thread samples
        buf = np.ones(48 * MiB // 8)
        time.sleep(0.2)
        del buf
        time.sleep(0.1)
    peak = sampler.result
    assert peak.samples >= 5
    assert peak.peak is not None and peak.peak.total == peak.peak.anon
    assert peak.peak.anon - base >= 44 * MiB  # the buffer's time is in the peak, though it is gone now
    assert sample(os.getpid(), []).anon < peak.peak.anon - 40 * MiB


# In a fresh interpreter: after one 16 MiB block is freed, glibc serves 2 MiB blocks from its heap; freeing
# them leaves holes that stay resident below a live block. RssAnon is read from the kernel's /proc.
FRAGMENT = r"""
import ctypes, json, sys
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.malloc.argtypes = [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
if sys.argv[1] == "fixed":
    from mtx.runtime.memory import keep_freed_buffers_unmapped
    assert keep_freed_buffers_unmapped()
elif sys.argv[1] == "load":  # the onnxruntime backend fixes it before it opens its session
    import mtx.runtime
    mtx.runtime.load(sys.argv[2])
def anon():
    for line in open("/proc/self/status"):
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
def touched(n):
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    return p
class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]
libc.mallinfo2.restype = MallInfo2
libc.free(touched(16 << 20))  # raises the default threshold to 16 MiB
mapped_before = libc.mallinfo2().hblks
probe = libc.malloc(2 << 20)
own_mapping = libc.mallinfo2().hblks - mapped_before  # 1: served by a mapping of its own, 0: from the heap
libc.free(probe)
blocks = [touched(2 << 20) for _ in range(32)]
pin = touched(64 << 10)
base = anon()
for p in blocks:
    libc.free(p)
print(json.dumps({"held": base, "after_free": anon(), "own_mapping": own_mapping}))
"""


def _heap(*args: str) -> dict[str, int]:
    out = subprocess.run([sys.executable, "-c", FRAGMENT, *args], capture_output=True, text=True, check=True)
    return json.loads(out.stdout)


needs_glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc (mallopt, mallinfo2)")


@needs_glibc
def test_freed_heap_blocks_are_returned_once_the_threshold_is_fixed():
    default, fixed = _heap("default"), _heap("fixed")
    assert default["own_mapping"] == 0 and fixed["own_mapping"] == 1
    assert default["held"] - default["after_free"] < 16 * MiB  # glibc's default: the 64 MiB freed stays
    assert fixed["held"] - fixed["after_free"] >= 56 * MiB  # fixed: each block its own mapping, returned


@needs_glibc
def test_the_onnxruntime_backend_fixes_the_threshold(parity_export):
    assert _heap("load", str(parity_export("mistral", "onnxruntime")))["own_mapping"] == 1


def test_a_child_is_sampled_from_the_parent_until_it_exits(tmp_path: Path):
    import psutil

    from mtx.runtime.memory import wait_sampling

    weights = tmp_path / "w.bin"
    with open(weights, "wb") as f:
        f.truncate(16 * MiB)
    code = ("import mmap, sys, time, numpy as np; f = open(sys.argv[1], 'rb'); "
            "m = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ); b = np.ones(64 * 2**20 // 8); time.sleep(0.6)")
    proc = psutil.Popen([sys.executable, "-c", code, str(weights)])
    peak = wait_sampling(proc, [weights], interval_s=0.02)
    assert proc.wait() == 0
    assert peak.samples >= 5 and peak.peak is not None
    assert peak.peak.mapped_weights == 16 * MiB
    assert peak.peak.anon >= 64 * MiB

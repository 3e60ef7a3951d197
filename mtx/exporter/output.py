"""The output folder's life cycle: nothing half-written, nothing lost, one export per folder at a time.

* The export is assembled in ``.{name}.{pid}.{random}.partial`` next to OUT and moved into place
  only when complete; any failure (bad input, a full disk, Ctrl-C, SIGTERM) removes it.
* ``.{name}.lock`` in OUT's parent is held (``flock``) for the whole export: a second export to the
  same OUT fails at once instead of silently replacing the first. It is removed when done.
* Under that lock, partial folders of processes that are gone (a ``kill -9``) are swept first.
* The move is atomic: ``renameat2(RENAME_NOREPLACE)`` when OUT is absent (it fails if OUT appeared
  meanwhile), ``renameat2(RENAME_EXCHANGE)`` to replace an existing OUT (``--force``), so OUT is at
  every instant either the old export or the new one; the old one is then deleted.
* A write that fails for the environment's reasons (disk full, read-only, permission) is an
  :class:`OutputError` naming the path and the cause (exit code 1).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mtx.errors import MtxError, UsageError

PARTIAL_SUFFIX = ".partial"
_AT_FDCWD = -100
_RENAME_NOREPLACE = 1
_RENAME_EXCHANGE = 2


class OutputError(MtxError):
    """The export folder could not be written (disk full, read-only, permission denied)."""

    exit_code = 1


def _renameat2(src: Path, dst: Path, flags: int) -> bool:
    """Linux renameat2; False where the kernel, libc or file system lacks it (raises other OSErrors)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
        return False
    raise OSError(err, os.strerror(err), str(dst))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _owner_pid(path: Path, out: Path) -> int | None:
    """The pid in ``.{name}.{pid}.{random}.partial``, or None for another shape of name."""
    middle = path.name[len(out.name) + 2:-len(PARTIAL_SUFFIX)]
    head = middle.split(".", 1)[0]
    return int(head) if head.isdigit() else None


def sweep_stale(out: Path) -> list[Path]:
    """Remove partial folders of exports to ``out`` whose process is gone; returns what was removed."""
    removed = []
    for path in out.parent.glob(f".{out.name}.*{PARTIAL_SUFFIX}"):
        pid = _owner_pid(path, out)
        if not path.is_dir() or (pid is not None and _alive(pid)):
            continue
        if path.name.endswith(f".replaced{PARTIAL_SUFFIX}") and not out.exists():
            os.rename(path, out)  # a replacement died between its two renames: the earlier export comes back
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """Hold ``.{name}.lock`` in OUT's parent; UsageError at once if another export holds it."""
    import fcntl

    path = out.parent / f".{out.name}.lock"
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise UsageError(f"out {out}: another mtx export to this folder is running; wait for it to finish",
                             params=("out",)) from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino  # not a lock file that its holder just removed
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)
        os.close(fd)


@contextlib.contextmanager
def staging(out: Path) -> Iterator[Path]:
    """A temporary folder next to ``out`` for the export, under the folder's lock; removed (with any
    parents created for it) on failure. :func:`commit` moves it into place."""
    created: list[Path] = []
    try:
        parent = out.parent
        while not parent.exists():
            created.append(parent)
            parent = parent.parent
        for p in reversed(created):
            p.mkdir()
        with _lock(out):
            sweep_stale(out)
            tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{os.getpid()}.", suffix=PARTIAL_SUFFIX, dir=out.parent))
            try:
                yield tmp
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
    except BaseException as e:
        for p in created:
            with contextlib.suppress(OSError):
                p.rmdir()
        if isinstance(e, OSError) and not isinstance(e, MtxError):
            raise OutputError(f"{e.filename or out}: cannot write the export ({e.strerror or e})") from None
        raise


def commit(tmp: Path, out: Path, force: bool) -> None:
    """Move the finished folder ``tmp`` to ``out`` atomically. With ``force`` an earlier ``out`` is
    swapped out in the same step and then deleted; without it, an ``out`` that is not an empty folder
    (one that appeared during the export) is never replaced: UsageError."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp made it 0700; the export is an ordinary folder
    if out.is_dir() and not out.is_symlink() and not any(out.iterdir()):
        out.rmdir()  # an empty folder is replaced like an absent one
    if out.exists() and not force:
        raise UsageError(f"out {out}: appeared while exporting; nothing was replaced", params=("out",))
    if not out.exists():
        if _renameat2(tmp, out, _RENAME_NOREPLACE):
            return
        if out.exists():
            raise UsageError(f"out {out}: appeared while exporting; nothing was replaced", params=("out",))
        os.rename(tmp, out)
        return
    if _renameat2(tmp, out, _RENAME_EXCHANGE):
        shutil.rmtree(tmp)  # now the earlier export
        return
    old = out.with_name(f".{out.name}.{os.getpid()}.replaced{PARTIAL_SUFFIX}")  # swept if we die in between
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)

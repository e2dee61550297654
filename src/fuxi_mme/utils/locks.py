"""Advisory locks between fuxi-mme processes (``flock``), so one process never packs, moves or
rewrites what another is still writing.

* A training holds its run folder's lock from the moment the folder is known until the run
  ends (``train/run.py``); a second process training into the same folder stops with a one-line
  error.
* The experiment runner holds each job's ``seed<k>.log`` lock before it touches the job's folder
  and passes it to the child (which inherits the file), so it covers the seconds before the
  child locks its folder and after it lets go. A job whose log or folder another process holds
  is left to that process, not started again over it.
* Packing a suite's logs and runs (``experiments/logs.py``) holds the suite folder's lock
  exclusively and leaves locked runs loose; a runner holds it shared while it prepares and
  starts a job, so no job starts in the middle of a packing, and two packings take turns
  rewriting ``runs.jsonl``.

The kernel drops a lock when its holder exits, however it exits, so a crashed run never leaves
a stale lock behind. Where ``fcntl`` does not exist (Windows), or the file system has no locks
(some NFS and Lustre mounts), they are no-ops: nothing waits and nothing is protected.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no flock
    fcntl = None  # type: ignore[assignment]


class InUseError(FileExistsError):
    """The path is locked by another process (one line: which path, and what to do)."""


def _open(path: Path) -> int:
    """A descriptor to lock: a folder is opened read-only (Linux and macOS lock folders too)."""
    return os.open(path, (os.O_RDONLY | getattr(os, "O_DIRECTORY", 0)) if path.is_dir() else os.O_RDONLY)


def _try_lock(fd: int, exclusive: bool = True) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except OSError as exc:
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return False
        return True  # a file system without locks (ENOLCK, ENOTSUP): nothing to wait for


RETRY_S = 2.0  # a non-blocking claim retries this long: another process's in_use() probe holds a lock for microseconds


def _claim(fd: int, retry_s: float) -> bool:
    deadline = time.monotonic() + retry_s
    while not _try_lock(fd):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)
    return True


@contextlib.contextmanager
def held(path: str | os.PathLike[str], what: str = "", blocking: bool = False, retry_s: float = RETRY_S, exclusive: bool = True) -> Iterator[None]:
    """Hold ``path``'s lock for the body, exclusive or (``exclusive=False``, blocking only)
    shared. Not ``blocking``: raise :class:`InUseError` when another process still holds it
    after ``retry_s`` (``what`` names the holder's kind in the message); ``blocking``: wait."""
    p = Path(path)
    if fcntl is None:
        yield
        return
    fd = _open(p)
    try:
        if blocking:
            with contextlib.suppress(OSError):  # ENOLCK and the like: go on unlocked
                fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        elif not _claim(fd, retry_s):
            raise InUseError(f"{p} is in use by another {what or 'fuxi-mme'} process; wait for it to end or pick another folder")
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def shared(path: str | os.PathLike[str]) -> contextlib.AbstractContextManager[None]:
    """Hold ``path``'s lock shared for the body, waiting for an exclusive holder to finish (the
    runner's hold on a suite folder while it starts a job)."""
    return held(path, blocking=True, exclusive=False)


def try_hold_file(f: IO[str], wait_s: float = 0.0) -> bool:
    """Lock an open file for as long as it (or a child's inherited copy) stays open (the
    runner's ``seed<k>.log``); False when another process still holds it after ``wait_s``."""
    if fcntl is None:
        return True
    return _claim(f.fileno(), wait_s)


def in_use(path: str | os.PathLike[str]) -> bool:
    """Whether another process holds ``path``'s lock (False for a missing path, or without flock)."""
    p = Path(path)
    if fcntl is None or not p.exists():
        return False
    try:
        fd = _open(p)
    except OSError:
        return False
    try:
        return not _try_lock(fd, exclusive=False)
    finally:
        os.close(fd)

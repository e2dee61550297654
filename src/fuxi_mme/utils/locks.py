"""Advisory locks between fuxi-mme processes (``flock``), so one process never packs, moves or
rewrites what another is still writing.

* A training process holds its run folder's lock from the moment the folder is known until the
  run ends (``train/run.py``); a second process training into the same folder stops with a
  one-line error, and the experiment runner leaves a locked run's files where they are.
* The experiment runner holds each running job's ``seed<k>.log`` lock, covering the seconds
  before the child has started and after it has let go of its folder.
* Packing a suite's logs and runs (``experiments/logs.py``) holds the suite folder's lock, so
  two commands ending at once do not each rewrite ``runs.jsonl`` from a stale read.

The kernel drops a lock when its holder exits, however it exits, so a crashed run never leaves
a stale lock behind. Where ``fcntl`` does not exist (Windows), or the file system has no locks,
they are no-ops.
"""

from __future__ import annotations

import contextlib
import errno
import os
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


@contextlib.contextmanager
def held(path: str | os.PathLike[str], what: str = "", blocking: bool = False) -> Iterator[None]:
    """Hold ``path``'s exclusive lock for the body. Not ``blocking``: raise :class:`InUseError`
    at once when another process holds it (``what`` names the holder's kind in the message);
    ``blocking``: wait for it."""
    p = Path(path)
    if fcntl is None:
        yield
        return
    fd = _open(p)
    try:
        if blocking:
            with contextlib.suppress(OSError):  # ENOLCK and the like: go on unlocked
                fcntl.flock(fd, fcntl.LOCK_EX)
        elif not _try_lock(fd):
            raise InUseError(f"{p} is in use by another {what or 'fuxi-mme'} process; wait for it to end or pick another folder")
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock


def hold_file(f: IO[str]) -> None:
    """Lock an open file for as long as it stays open (the runner's ``seed<k>.log``)."""
    if fcntl is not None:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)


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

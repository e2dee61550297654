"""Child processes that a command stops with itself: SIGTERM read as Ctrl-C, and a child's whole
process group (its compile workers too) stopped politely, then killed."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


STOP_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP (a closed terminal or ssh session) raise
    KeyboardInterrupt in the main thread, so a killed command stops its children instead of
    leaving them running; elsewhere a no-op."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    for s in STOP_SIGNALS:
        signal.signal(s, _interrupt)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def stop_group(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Stop ``proc`` (started with ``start_new_session=True``) and every process of its group."""
    stop_groups([proc], grace_s)


def stop_groups(procs: list[subprocess.Popen], grace_s: float = 30.0) -> None:
    """Stop each of ``procs`` (started with ``start_new_session=True``) with its whole process
    group: SIGTERM to every group at once, then SIGKILL to what is left after ``grace_s`` in all.
    A second Ctrl-C or SIGTERM meanwhile does not cut the stop short."""
    main = threading.current_thread() is threading.main_thread()
    held = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, *STOP_SIGNALS)} if main else {}
    try:
        for proc in procs:
            _signal_group(proc, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                _signal_group(proc, signal.SIGKILL)
                proc.wait()
    finally:
        for s, h in held.items():
            signal.signal(s, h)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    if proc.pid <= 0:  # never signal our own group (pid 0) or every process (-1)
        return
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


@contextmanager
def restored_environ(*names: str) -> Iterator[None]:
    """Run the body, then put the environment variables ``names`` back as they were before it
    (set to their old values, or removed if they were unset)."""
    saved = {k: os.environ.get(k) for k in names}
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def stat_fields(text: str) -> list[str]:
    """The fields of a ``/proc/<pid>/stat`` line after ``pid (comm) `` (a command name may hold
    spaces and parentheses): state, ppid, ..., utime at 11, starttime at 19."""
    return text[text.rindex(")") + 2 :].split()


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (Linux /proc), or None elsewhere: the start-up
    a run pays before ``train`` (interpreter, imports) in its phase breakdown. The start is in
    clock ticks since boot, so it is read against the time since boot (to 10 ms), not against
    the boot's wall-clock second (``btime``, which would put up to a second of error in it)."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(stat_fields(f.read())[19])
        if hasattr(time, "CLOCK_BOOTTIME"):
            since_boot = time.clock_gettime(time.CLOCK_BOOTTIME)
        else:
            with open("/proc/uptime") as f:
                since_boot = float(f.read().split()[0])
        return max(0.0, since_boot - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        return None

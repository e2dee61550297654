"""Where a process's last seconds go (``benchmarks/time_to_result.py``): with
``FUXI_MME_EXIT_TIMES=<file>`` set, ``python -m fuxi_mme`` writes one JSON line to that file
with the wall-clock times (``time.time()``) of

* ``process_start``: the process's start (Linux ``/proc``; None elsewhere);
* ``command_end``: the command's function returned (after ``train()``: its run written);
* ``atexit_start``: the first exit handler ran (after Python joined the threads and thread
  pools still running);
* ``atexit_end``: the last exit handler ran (those of torch, Inductor's compile workers and
  the others are done; what follows is the interpreter's and the CUDA driver's teardown).

The benchmark, timing the whole process from outside, takes the rest after ``atexit_end``.
Off by default: nothing is registered or written without the variable.
"""

from __future__ import annotations

import atexit
import json
import os
import time

ENV = "FUXI_MME_EXIT_TIMES"
_times: dict[str, float | None] = {}


def _last() -> None:
    _times["atexit_end"] = time.time()
    path = os.environ.get(ENV)
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(_times) + "\n")


def _first() -> None:
    _times["atexit_start"] = time.time()


def install() -> None:
    """Call before anything else registers exit handlers (they run last-registered first), so
    this one runs last."""
    if not os.environ.get(ENV):
        return
    from .procs import seconds_since_process_start

    since = seconds_since_process_start()
    _times["process_start"] = None if since is None else time.time() - since
    atexit.register(_last)


def command_ended() -> None:
    """At the end of the command: registered now, this handler runs before every other one."""
    if not os.environ.get(ENV) or "command_end" in _times:
        return
    _times["command_end"] = time.time()
    atexit.register(_first)


QUICK_EXIT_ENV = "FUXI_MME_QUICK_EXIT"


def quick_exit(code: int) -> int:
    """End the program without the interpreter's teardown (freeing every module and object,
    then the CUDA driver's clean-up), which took 0.8 s of a CPU demo run and is pure waiting:
    the run is written by now. Python's own exit steps that matter still happen first, in
    order: thread pools stopped and non-daemon threads joined (``threading._shutdown``, as
    Python does), streams flushed, the exit handlers run (logging's flush, Inductor's compile
    workers, torch's), and C stdio's buffers flushed. Falls back to a normal exit (returns
    ``code``) where a profiler or coverage tool is attached (it writes after the program ends),
    with ``FUXI_MME_QUICK_EXIT=0``, and, where this Python lacks ``threading._shutdown``, while
    a non-daemon thread runs. Skipped still: C-level exit handlers and C++ destructors."""
    if os.environ.get(QUICK_EXIT_ENV, "1") == "0":
        return code
    import sys
    import threading

    if _observed(sys):  # a profiler or coverage tool writes its results after the program ends
        return code
    join = getattr(threading, "_shutdown", None)  # Python's own first exit step (private, so checked)
    if join is None or threading.current_thread() is not threading.main_thread():
        if any(t.is_alive() and not t.daemon for t in threading.enumerate() if t is not threading.main_thread()):
            return code
    else:
        # as at a normal exit: thread pools told to stop (a compile left Inductor's idle), then
        # every non-daemon thread joined; a Ctrl-C while waiting leaves the rest to Python's exit
        try:
            join()
        except KeyboardInterrupt:
            return code

    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except (OSError, ValueError):  # a closed pipe: Python's normal exit reports it
        return code
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    try:  # what C code wrote through stdio's buffers
        import ctypes

        ctypes.CDLL(None).fflush(None)
    except (OSError, AttributeError):
        pass
    os._exit(code)


def _observed(sys_module) -> bool:
    """A profiler (cProfile sets the profile hook), a tracer or coverage (the trace hook, or a
    ``sys.monitoring`` tool on Python 3.12+) is attached."""
    if sys_module.getprofile() is not None or sys_module.gettrace() is not None:
        return True
    monitoring = getattr(sys_module, "monitoring", None)
    return monitoring is not None and any(monitoring.get_tool(i) is not None for i in range(6))

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

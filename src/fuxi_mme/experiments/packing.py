"""Packing runs onto a GPU by measured memory, not a fixed count (docs/performance.md#many-runs-per-gpu).

``--jobs`` bounds how many runs share the host; on top of it a run starts on a GPU only when
the GPU's free memory (``nvidia-smi``) covers what runs of its kind were measured to need
(their logged peak, with a margin), or when nothing else runs there. A run that still ends in
CUDA out-of-memory (another run grew after it started) is started again once memory frees up,
at most twice, and its kind's need is raised. Used by ``experiment`` and ``tune``.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path

log = logging.getLogger("fuxi_mme")

OOM_RETRIES = 2


def free_memory_gb(gpu: str) -> float | None:
    """Free memory of GPU ``gpu`` (an index as in CUDA_VISIBLE_DEVICES) in GiB, from nvidia-smi;
    None when it cannot be read (no nvidia-smi, a UUID it does not know): then only --jobs bounds."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None
    try:
        out = subprocess.run(
            [exe, "--query-gpu=memory.free", "--format=csv,noheader,nounits", "-i", gpu], capture_output=True, text=True, timeout=20, check=True
        ).stdout
        return float(out.strip().splitlines()[0]) / 1024
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def peak_memory_gb(run_dir: Path) -> float | None:
    """The largest GPU memory a run logged (``gpu_mem_gb`` of its train records), or None."""
    f = run_dir / "metrics.jsonl"
    if not f.exists():
        return None
    peaks = []
    for line in f.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec.get("gpu_mem_gb"), (int, float)):
            peaks.append(float(rec["gpu_mem_gb"]))
    return max(peaks) if peaks else None


def ended_out_of_memory(log_file: Path) -> bool:
    """Whether a run's output ends in a CUDA out-of-memory error."""
    if not log_file.exists():
        return False
    tail = log_file.read_text(errors="replace")[-4000:]
    return "out of memory" in tail.lower()


class MemoryGate:
    """Lets a run start on a GPU when the GPU's free memory covers the run's expected need.

    The need of a kind of run (any hashable key, e.g. (dataset, variant)) is learned from the
    peaks its finished runs logged: ``peak * 1.25 + 1.5`` GiB (the CUDA context, graph pools
    and the allocator's cache come on top of what PyTorch reports); unknown kinds assume
    ``default_gb``. After a start, the gate waits ``settle_s`` before reading the free memory
    again, so a starting run's allocations are seen by the next decision."""

    def __init__(
        self,
        free: Callable[[str], float | None] = free_memory_gb,
        default_gb: float = 8.0,
        settle_s: float = 15.0,
        poll_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.free, self.default_gb, self.settle_s, self.poll_s = free, default_gb, settle_s, poll_s
        self.clock, self.sleep = clock, sleep
        self.need: dict[Hashable, float] = {}
        self.running: dict[str, int] = {}
        self.last_start: dict[str, float] = {}
        self.lock = threading.Lock()  # the counters
        self.deciding = threading.Lock()  # one start decision at a time

    def expect(self, key: Hashable) -> float:
        return self.need.get(key, self.default_gb)

    def learn(self, key: Hashable, peak_gb: float | None) -> None:
        if peak_gb is not None:
            self.need[key] = max(self.need.get(key, 0.0), peak_gb * 1.25 + 1.5)

    def raise_need(self, key: Hashable) -> None:
        """After an out-of-memory end: this kind needs more than was assumed."""
        self.need[key] = self.expect(key) * 1.5

    def acquire(self, gpu: str | None, key: Hashable) -> None:
        """Block until a run of kind ``key`` may start on ``gpu``; count it as running there."""
        if gpu is None:
            return
        with self.deciding:  # one decision at a time, so two runs never count the same free memory
            while True:
                with self.lock:
                    busy = self.running.get(gpu, 0)
                settled = self.clock() - self.last_start.get(gpu, -1e9) >= self.settle_s
                if busy == 0:
                    break
                free = self.free(gpu)
                if free is None or (settled and free >= self.expect(key)):  # no reading: only --jobs bounds
                    break
                self.sleep(self.poll_s)
            with self.lock:
                self.running[gpu] = self.running.get(gpu, 0) + 1
            self.last_start[gpu] = self.clock()

    def try_acquire(self, gpu: str | None, key: Hashable) -> bool:
        """:meth:`acquire` without waiting: True (counted as running) when a run may start now."""
        if gpu is None:
            return True
        with self.deciding:
            with self.lock:
                busy = self.running.get(gpu, 0)
            if busy:
                free = self.free(gpu)
                settled = self.clock() - self.last_start.get(gpu, -1e9) >= self.settle_s
                if free is not None and (not settled or free < self.expect(key)):
                    return False
            with self.lock:
                self.running[gpu] = busy + 1
            self.last_start[gpu] = self.clock()
            return True

    def release(self, gpu: str | None) -> None:
        if gpu is not None:
            with self.lock:
                self.running[gpu] -= 1

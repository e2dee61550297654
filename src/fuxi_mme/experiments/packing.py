"""Packing runs onto a GPU by measured memory and host load, not a fixed count
(docs/performance.md#many-runs-per-gpu).

``--jobs`` bounds how many runs share the host; on top of it a run starts on a GPU only when
nothing else runs there, or when both

* the GPU's free memory (``nvidia-smi``) covers what runs of its kind were measured to need
  (their logged peak, with a margin), and
* the host's idle cores (``/proc/stat``, over the cores this process may use) cover the cores
  runs of its kind were measured to keep busy (their CPU seconds over their wall seconds, from
  ``run.json``).

A run that still ends in CUDA out-of-memory (another run grew after it started) is started
again once memory frees up, at most twice, and its kind's need is raised. Used by
``experiment`` and ``tune``.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Hashable
from pathlib import Path

from .store import has_run_file, run_file

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


def peak_memory_gb(run_dir: Path, info: dict | None = None) -> float | None:
    """The largest GPU memory a run reached: ``peak_gpu_gb`` of its ``run.json`` (the whole
    run, evaluations included; loose or packed into its suite's ``runs.jsonl``) and the
    ``gpu_mem_gb`` of its train records in ``metrics.jsonl`` where that file is still loose;
    None when neither says. ``info``: its ``run.json`` when already read."""
    peaks = []
    f = run_dir / "metrics.jsonl"
    if f.exists():
        for line in f.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and isinstance(rec.get("gpu_mem_gb"), (int, float)):
                peaks.append(float(rec["gpu_mem_gb"]))
    info = _run_info(run_dir) if info is None else info
    if isinstance(info.get("peak_gpu_gb"), (int, float)):
        peaks.append(float(info["peak_gpu_gb"]))
    return max(peaks) if peaks else None


def _run_info(run_dir: Path) -> dict:
    """A run's ``run.json``, loose or packed; {} when there is none or it cannot be read."""
    try:
        info = run_file(run_dir, "run.json")
    except (OSError, ValueError):
        return {}
    return info if isinstance(info, dict) else {}


def ended_out_of_memory(log_file: Path) -> bool:
    """Whether a run's output ends in a CUDA out-of-memory error."""
    if not log_file.exists():
        return False
    tail = log_file.read_text(errors="replace")[-4000:]
    return "out of memory" in tail.lower()


def host_cores(run_dir: Path, info: dict | None = None) -> float | None:
    """The host cores a finished run kept busy on average: its ``host_cpu_seconds`` (process and
    compile workers) over its phases' total wall seconds, from ``run.json`` (loose or packed;
    ``info`` when already read); None when absent."""
    info = _run_info(run_dir) if info is None else info
    cpu, wall = info.get("host_cpu_seconds"), (info.get("phases") or {}).get("total")
    if not isinstance(cpu, (int, float)) or not isinstance(wall, (int, float)) or wall <= 0:
        return None
    return float(cpu) / float(wall)


def learn_from_finished(gate: PackingGate, key: Hashable, run_dirs: list[Path]) -> None:
    """Teach ``gate`` the needs of kind ``key`` from finished GPU runs of that kind (a resumed
    suite's other seeds), so its next runs need not wait as an unmeasured kind. CPU runs are
    left out: their cores say nothing of a GPU run's."""
    for d in run_dirs:
        info = _run_info(d)
        if (info.get("device") or {}).get("device") == "cuda" and has_run_file(d, "metrics.json"):
            learn_run(gate, key, d, info)


def learn_run(gate: PackingGate, key: Hashable, run_dir: Path, info: dict | None = None) -> None:
    """Teach ``gate`` what a finished run of kind ``key`` needed (its ``run.json`` read once;
    ``info`` when already read)."""
    info = _run_info(run_dir) if info is None else info
    gate.learn(key, peak_memory_gb(run_dir, info), host_cores(run_dir, info))


class HostLoad:
    """Idle cores of the host, read from ``/proc/stat``: the idle share (idle + iowait) of the
    time of the cores this process may run on since the previous reading, times their count.
    A reading older than ``max_age_s`` is renewed first, and two readings are at least
    ``window_s`` apart, so the answer describes the last few seconds. None where there is no
    ``/proc/stat`` (not Linux): then the host does not bound."""

    def __init__(
        self,
        stat: Path = Path("/proc/stat"),
        cores: set[int] | None = None,
        window_s: float = 1.0,
        max_age_s: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        self.stat, self.window_s, self.max_age_s, self.clock, self.sleep = stat, window_s, max_age_s, clock, sleep
        if cores is None:
            cores = set(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
        self.cores = cores
        self.last: tuple[float, float, float] | None = None  # (time, idle ticks, all ticks)

    def _read(self) -> tuple[float, float, int] | None:
        """(idle ticks, all ticks, cores counted) summed over this process's cores."""
        try:
            lines = self.stat.read_text().splitlines()
        except OSError:
            return None
        idle = total = 0.0
        n = 0
        for line in lines:
            name, _, rest = line.partition(" ")
            if not name.startswith("cpu") or name == "cpu" or not name[3:].isdigit():
                continue
            if self.cores is not None and int(name[3:]) not in self.cores:
                continue
            ticks = [float(x) for x in rest.split()[:8]]  # user nice system idle iowait irq softirq steal
            if len(ticks) < 5:
                continue
            idle += ticks[3] + ticks[4]
            total += sum(ticks)
            n += 1
        return (idle, total, n) if n else None

    def idle_cores(self) -> float | None:
        now, cur = self.clock(), self._read()
        if cur is None:
            return None
        if self.last is None or now - self.last[0] > self.max_age_s:  # no recent reading: take one
            self.last = (now, cur[0], cur[1])
            self.sleep(self.window_s)
        elif now - self.last[0] < self.window_s:
            self.sleep(self.window_s - (now - self.last[0]))
        now, cur = self.clock(), self._read()
        if cur is None:
            return None
        d_idle, d_total = cur[0] - self.last[1], cur[1] - self.last[2]
        self.last = (now, cur[0], cur[1])
        if d_total <= 0:
            return None
        return cur[2] * min(max(d_idle / d_total, 0.0), 1.0)


class PackingGate:
    """Lets a run start on a GPU when the GPU's free memory and the host's idle cores cover the
    run's expected needs (or when nothing else runs on that GPU).

    The needs of a kind of run (any hashable key, e.g. (dataset, variant)) are learned from its
    finished runs: memory from the peaks they logged, ``peak * 1.25 + 1.5`` GiB (the CUDA
    context, graph pools and the allocator's cache come on top of what PyTorch reports), unknown
    kinds ``default_gb``; host cores from the cores they kept busy on average (``host_cores``),
    unknown kinds ``default_cores``. A kind not measured yet takes the needs of its family
    (:meth:`relate`), so the noise variants of one model start as measured once any of them
    finished (docs/performance.md#many-runs-per-gpu). A run that started less than ``settle_s`` ago may not show
    yet in the GPU's free memory or the host's idle cores: when it and the run asking are of
    measured kinds, its measured needs are taken off what the readings show (it is counted as
    if it had allocated everything already); when either kind is unmeasured the gate waits until
    the last start has settled, so that the start shows in the readings. ``free`` answering
    None (no ``nvidia-smi``) leaves both bounds out (only ``--jobs`` bounds), ``idle``
    answering None (no ``/proc/stat``) the host's."""

    def __init__(
        self,
        free: Callable[[str], float | None] = free_memory_gb,
        default_gb: float = 8.0,
        settle_s: float = 15.0,
        poll_s: float = 2.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
        idle: Callable[[], float | None] | None = None,
        default_cores: float = 1.0,
    ):
        self.free, self.default_gb, self.settle_s, self.poll_s = free, default_gb, settle_s, poll_s
        self.clock, self.sleep = clock, sleep
        self.idle = idle if idle is not None else HostLoad().idle_cores
        self.default_cores = default_cores
        self.need: dict[Hashable, float] = {}
        self.cores: dict[Hashable, float] = {}
        # kind -> its family (runs expected to need the same: the same model and shapes on the
        # same data; :func:`plan.job_family`): an unmeasured kind takes its family's needs
        self.family: dict[Hashable, Hashable] = {}
        self.running: dict[str, int] = {}
        # (time, GPU, kind) of the recent starts on any GPU: the host's load is shared by all of them
        self.starts: list[tuple[float, str, Hashable]] = []
        self.lock = threading.Lock()  # the counters
        self.deciding = threading.Lock()  # one start decision at a time

    def relate(self, key: Hashable, family: Hashable) -> None:
        """Runs of kind ``key`` are expected to need what runs of ``family`` were measured to need
        until one of ``key`` itself is measured (e.g. the noise variants of one model)."""
        self.family[key] = family

    def _lookup(self, table: dict[Hashable, float], key: Hashable) -> float | None:
        if key in table:
            return table[key]
        family = self.family.get(key)
        return table.get(family) if family is not None else None

    def _kinds(self, key: Hashable) -> list[Hashable]:
        """``key`` and its family (where it has one): what a run of ``key`` teaches."""
        family = self.family.get(key)
        return [key] if family is None else [key, family]

    def measured(self, key: Hashable) -> bool:
        return self._lookup(self.need, key) is not None

    def expect(self, key: Hashable) -> float:
        need = self._lookup(self.need, key)
        return self.default_gb if need is None else need

    def expect_cores(self, key: Hashable) -> float:
        cores = self._lookup(self.cores, key)
        return self.default_cores if cores is None else cores

    def learn(self, key: Hashable, peak_gb: float | None, cores: float | None = None) -> None:
        """A finished run of kind ``key`` needed ``peak_gb`` GiB at its peak and kept ``cores``
        busy: its kind's and its family's needs are at least that (with a margin for memory)."""
        for k in self._kinds(key):
            if peak_gb is not None:
                self.need[k] = max(self.need.get(k, 0.0), peak_gb * 1.25 + 1.5)
            if cores is not None:
                self.cores[k] = max(self.cores.get(k, 0.0), cores)

    def _may_start(self, gpu: str, key: Hashable) -> bool:
        """With a run already on ``gpu``: whether one of ``key`` may join it now. Without a
        reading of the GPU's memory (no ``nvidia-smi``) only ``--jobs`` bounds; otherwise the
        free memory and the host's idle cores (shared by all GPUs; no ``/proc/stat``: memory
        alone) must cover the kind's needs, less what the starts of the last ``settle_s`` will
        take (:meth:`_unsettled`; None: wait for them to settle)."""
        free = self.free(gpu)
        if free is None:
            return True
        unsettled = self._unsettled(key)
        if unsettled is None:
            return False
        if free - sum(self.expect(k) for g, k in unsettled if g == gpu) < self.expect(key):
            return False
        idle = self.idle()
        return idle is None or idle - sum(self.expect_cores(k) for _, k in unsettled) >= self.expect_cores(key)

    def _unsettled(self, key: Hashable) -> list[tuple[str, Hashable]] | None:
        """(GPU, kind) of the starts of the last ``settle_s``, which the readings may not show
        yet; None when one of them or ``key`` is of a kind not measured yet (its needs are a
        guess), so the decision waits for them to settle."""
        now = self.clock()
        self.starts = [s for s in self.starts if now - s[0] < self.settle_s]
        recent = [(g, k) for _, g, k in self.starts]
        if recent and not all(self.measured(k) for k in [key, *(k for _, k in recent)]):
            return None
        return recent

    def raise_need(self, key: Hashable) -> None:
        """After an out-of-memory end: this kind, and so its family, needs more than was assumed."""
        more = self.expect(key) * 1.5
        for k in self._kinds(key):
            self.need[k] = max(self.need.get(k, 0.0), more)

    def acquire(self, gpu: str | None, key: Hashable) -> None:
        """Block until a run of kind ``key`` may start on ``gpu``; count it as running there."""
        if gpu is None:
            return
        with self.deciding:  # one decision at a time, so two runs never count the same free memory
            while True:
                with self.lock:
                    busy = self.running.get(gpu, 0)
                if busy == 0 or self._may_start(gpu, key):
                    break
                self.sleep(self.poll_s)
            with self.lock:
                self.running[gpu] = self.running.get(gpu, 0) + 1
            self._started(gpu, key)

    def try_acquire(self, gpu: str | None, key: Hashable) -> bool:
        """:meth:`acquire` without waiting for other runs: True (counted as running) when a run may
        start now (a fresh reading of the host's load can take ``HostLoad.window_s``)."""
        if gpu is None:
            return True
        with self.deciding:
            with self.lock:
                busy = self.running.get(gpu, 0)
            if busy and not self._may_start(gpu, key):
                return False
            with self.lock:
                self.running[gpu] = busy + 1
            self._started(gpu, key)
            return True

    def _started(self, gpu: str, key: Hashable) -> None:
        self.starts.append((self.clock(), gpu, key))

    def release(self, gpu: str | None) -> None:
        if gpu is not None:
            with self.lock:
                self.running[gpu] -= 1

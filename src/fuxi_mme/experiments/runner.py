"""Running suites: each job a ``fuxi-mme train`` subprocess, several at once over the visible
GPUs, longest first; resumable (a job whose ``metrics.json`` exists is skipped). When a suite's
runs end, their per-epoch logs are packed (:mod:`fuxi_mme.experiments.logs`) and the suite is
aggregated."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path
from typing import IO, Any

from ..utils.locks import in_use, shared, try_hold_file
from ..utils.procs import sigterm_as_interrupt, stop_groups
from ..utils.runinfo import git_commit
from .aggregate import aggregate
from .logs import pack_logs, source_snapshot, write_copy
from .own import OwnData
from .packing import OOM_RETRIES, PackingGate, ended_out_of_memory, learn_from_finished, learn_run
from .page import write_docs
from .plan import GpuSlots, Job, aggregation_jobs, is_done, job_cost, job_family, plan, reusable_run, stale_changes, visible_gpus
from .store import has_run_file, set_aside, variant_runs
from .suites import Suite


class Stopping:
    """Shared by a suite's job threads: once set (Ctrl-C, SIGTERM) no job starts, and the
    running ones (their whole process groups) are stopped; the same command resumes them."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.lock = threading.Lock()
        self.running: set[subprocess.Popen] = set()

    def stop_all(self) -> int:
        with self.lock:  # after this, no job starts: it checks the event under the same lock
            self.event.set()
            procs = list(self.running)
        stop_groups(procs)
        return len(procs)


def command(job: Job) -> list[str]:
    """The job's ``fuxi-mme train`` command line."""
    return [sys.executable, "-m", "fuxi_mme", *job.args]


def launch(job: Job, log: IO[str], env: dict[str, str]) -> subprocess.Popen:
    """Start the job's command, output to ``log``, in its own session (so a Ctrl-C reaches the
    suite, which stops the run and the compile workers it started)."""
    return subprocess.Popen(command(job), stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)


NOT_STARTED = -2  # a job the time budget left unstarted (not a failure: the same command runs it)
BUSY = -3  # a job another process is training (not a failure: left to it)
LOG_WAIT_S = 30.0  # a run's compile workers may hold its log a moment after it ends


def _clear_folder(job: Job) -> bool:
    """Make way for a new run in ``job``'s folder (the caller holds its locks): a run finished
    with other settings than planned (or one ``--rerun`` asks for) is moved aside to
    ``seed<k>.stale``, kept until the next one; an interrupted one is removed. False when the
    folder holds a run finished as planned (nothing to do)."""
    changes = stale_changes(job)
    if has_run_file(job.run_dir, "metrics.json") and not changes:
        return False
    if changes:
        aside = set_aside(job.run_dir)
        # one write: threads do not interleave
        sys.stdout.write(f"{job.run_dir}: to train again ({'; '.join(changes)}), moved to {aside.name}\n")
        sys.stdout.flush()
    elif job.run_dir.exists():
        shutil.rmtree(job.run_dir)
    return True


@contextlib.contextmanager
def _claimed(job: Job, wait_s: float) -> Iterator[IO[str] | int]:
    """The job's folder made ready for a new run, for the body: under the suite folder's shared
    lock (no packing meanwhile) and the job's ``seed<k>.log`` lock, which a child started in the
    body inherits; yields the emptied log, or :data:`BUSY` (another process trains the job: its
    log or folder is locked, the log waited for up to ``wait_s``) or 0 (finished as planned)."""
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    with shared(job.run_dir.parents[2]), open(job.run_dir.parent / f"{job.run_dir.name}.log", "a") as log:
        if in_use(job.run_dir) or not try_hold_file(log, wait_s=wait_s) or in_use(job.run_dir):
            yield BUSY
        elif not _clear_folder(job):  # checked again, now that no other process can change the folder
            yield 0
        else:
            log.truncate(0)  # opened to append so that a busy job's log was not emptied
            yield log


def run_job(job: Job, env: dict[str, str], stopping: Stopping | None = None) -> tuple[Job, int, float]:
    """Train one job in a subprocess (output to ``seed<k>.log`` beside its folder); returns the
    job, its exit status and its wall seconds. A run finished with other settings than planned
    is moved aside to ``seed<k>.stale`` first; an interrupted one is started again cleanly.
    Under ``stopping`` set, nothing starts (exit status -1). A job that another process is
    training (its log or folder locked: another ``experiment`` command with the same job) is left
    to it (:data:`BUSY`). The job's folder is prepared under the suite folder's shared lock, so
    no packing runs meanwhile (utils/locks.py)."""
    stopping = stopping or Stopping()
    if stopping.event.is_set():  # before touching its folder or log
        return job, -1, 0.0
    if has_run_file(job.run_dir, "metrics.json") and not stale_changes(job):  # finished as planned
        return job, 0, 0.0
    with _claimed(job, LOG_WAIT_S) as log:
        if isinstance(log, int):
            return job, log, 0.0
        if job.gpu is not None:
            env = {**env, "CUDA_VISIBLE_DEVICES": job.gpu}
        t0 = time.perf_counter()
        with stopping.lock:
            if stopping.event.is_set():
                return job, -1, 0.0
            proc = launch(job, log, env)  # the child inherits the log and its lock
            stopping.running.add(proc)
    try:
        rc = proc.wait()
    finally:
        with stopping.lock:
            stopping.running.discard(proc)
    return job, rc, time.perf_counter() - t0


def run_jobs(
    pending: list[Job], jobs: int, names: dict[int, str], gate: PackingGate | None = None, deadline: float | None = None
) -> dict[str, list[str]]:
    """Run ``pending`` at most ``jobs`` at a time, longest first, each on the GPU with the fewest
    running jobs once its free memory and the host's idle cores cover the job's measured needs
    (``packing.py``); a job
    that ends out of GPU memory runs again (at most twice). No job starts after ``deadline``
    (``time.monotonic()``); those already running finish. Reports each as it ends. Returns
    the failed run folders per suite name."""
    slots = GpuSlots(visible_gpus())
    stopping = Stopping()
    gate = gate or PackingGate()
    # a kind: one suite's variant on one dataset (suites reuse variant names for other settings)
    kinds = {id(j): (names[id(j)], j.dataset, j.variant) for j in pending}
    for j in pending:  # a kind not measured yet takes its family's needs
        gate.relate(kinds[id(j)], job_family(j))
    for variant_dir, key in {j.run_dir.parent: kinds[id(j)] for j in pending}.items():  # a resumed suite's other seeds
        learn_from_finished(gate, key, variant_runs(variant_dir))
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(jobs, 1))))

    def start(job: Job) -> tuple[Job, int, float]:
        key = kinds[id(job)]
        total, rc = 0.0, NOT_STARTED
        for attempt in range(OOM_RETRIES + 1):
            if stopping.event.is_set():
                return job, -1, total
            if deadline is not None and time.monotonic() >= deadline:
                return job, rc, total  # not started, or its out-of-memory end stands
            job.gpu = slots.take()
            gate.acquire(job.gpu, key)
            try:
                if deadline is not None and time.monotonic() >= deadline:  # the wait for memory or cores outlasted the budget
                    return job, rc, total
                job, rc, dt = run_job(job, env, stopping)
            finally:
                gate.release(job.gpu)
                slots.give(job.gpu)
            if rc == BUSY:
                return job, rc, total
            total += dt
            if rc == 0:  # a run that failed early logged a peak far below its kind's need
                learn_run(gate, key, job.run_dir)
            if rc == 0 or job.gpu is None or attempt == OOM_RETRIES or not ended_out_of_memory(job.run_dir.parent / f"{job.run_dir.name}.log"):
                return job, rc, total
            gate.raise_need(key)
            what = f"[{names[id(job)]}] {job.dataset} / {job.variant} / seed {job.seed}"
            sys.stdout.write(f"{what}: out of GPU memory, started again when memory frees up\n")
            sys.stdout.flush()
        return job, rc, total

    failed: dict[str, list[str]] = {}
    unstarted = 0
    with ThreadPoolExecutor(max_workers=jobs) as pool, sigterm_as_interrupt():  # each job reported as it ends
        futures = [pool.submit(start, j) for j in sorted(pending, key=job_cost, reverse=True)]
        try:
            done = as_completed(futures)
            for fut in done:
                job, rc, dt = fut.result()
                if rc == NOT_STARTED:
                    unstarted += 1
                    continue
                if rc == BUSY:
                    what = f"[{names[id(job)]}] {job.dataset} / {job.variant} / seed {job.seed}"
                    print(f"{what}: being trained by another process, left to it", flush=True)
                    continue
                status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {job.run_dir}.log)"
                gpu = f" (GPU {job.gpu})" if job.gpu else ""
                print(f"[{names[id(job)]}] {job.dataset} / {job.variant} / seed {job.seed}: {status} {dt:.0f}s{gpu}", flush=True)
                if rc:
                    failed.setdefault(names[id(job)], []).append(str(job.run_dir))
        except KeyboardInterrupt:
            for fut in futures:
                fut.cancel()
            n = stopping.stop_all()
            print(f"interrupted: {n} running run(s) stopped, the others not started; the same command resumes the suite", flush=True)
            raise
    if unstarted:
        print(f"time budget spent: {unstarted} run(s) not started; the same command runs them", flush=True)
    return failed


def run_suites(
    suites: list[Suite],
    root: Path,
    data_root: Path | None,
    jobs: int = 1,
    extra: list[str] | None = None,
    datasets: list[str] | None = None,
    seeds: list[int] | None = None,
    docs: Path | None = None,
    variants: list[str] | None = None,
    rerun: str | None = None,
    time_budget: float | None = None,
    reuse: bool = True,
    own: dict[str, OwnData] | None = None,
    command: str | None = None,
) -> list[dict[str, Any]]:
    """Run the missing jobs of one or more suites as one queue, ``jobs`` at a time; then pack
    each suite's logs and aggregate it (and write ``docs`` when given). Finished runs are
    skipped, unless they trained with settings the plan no longer asks for (a changed preset
    default, say) or that ``rerun`` asks for: those run again, the old folder kept as ``seed<k>.stale``.
    ``time_budget`` (seconds): start no run after it; the runs already started finish.
    ``reuse``: a job that another suite's finished run already trained (the same settings,
    data and seed) takes that run's results instead of training again (:func:`reuse_identical`).
    ``own``: the datasets that are a user's files (``own.own_data``); ``command``: the command
    line, named at the top of ``docs``."""
    deadline = None if time_budget is None else time.monotonic() + time_budget
    todos = [plan(s, root, data_root, extra or [], datasets, seeds, variants=variants, rerun=rerun, own=own) for s in suites]
    names = {id(j): s.name for s, todo in zip(suites, todos) for j in todo}
    pending = [j for todo in todos for j in todo if j.invalid is None and not is_done(j)]
    if reuse:
        pending = [j for j in pending if not reuse_identical(j, root, names[id(j)])]
    failed = run_jobs(pending, jobs, names, deadline=deadline)
    for todo in todos:  # what --rerun asked for has run: the tables take the new runs
        for j in todo:
            j.rerun = None
    commit = git_commit()
    out = []
    for s, todo in zip(suites, todos):
        if (root / s.name).is_dir():
            pack_logs(root / s.name, settle_s=LOG_WAIT_S)
        out.append(aggregate(s, with_finished(s, todo, root, data_root, extra or [], own), root, failed.get(s.name, []), commit))
    if docs is not None:
        write_docs(root, docs, command)
    return out


def reuse_identical(job: Job, root: Path, suite_name: str) -> bool:
    """Give a job the results of another suite's finished run that trained exactly the same
    (:func:`.plan.reusable_run`), copied in by :func:`.logs.write_copy`: an unstarted job, or one
    ``--rerun without-beyond`` asks for (the old run set aside as :func:`run_job` does); never
    under ``--rerun all``, which asks for new training. A job another process is training is
    left alone. The folder is prepared as :func:`run_job` does (:func:`_claimed`). Returns whether it did."""
    if job.rerun == "all" or (has_run_file(job.run_dir, "metrics.json") and not stale_changes(job)):
        return False
    src = reusable_run(job, root)
    snap = source_snapshot(src, root) if src is not None else None
    if snap is None:
        return False
    with _claimed(job, 0.0) as log:
        if isinstance(log, int):
            return False
        write_copy(snap, job.run_dir)
        name = snap["name"]
        log.write(f"not trained: the same training as {name}, whose results were copied here (run.json: reused_from)\n")
    what = f"[{suite_name}] {job.dataset} / {job.variant} / seed {job.seed}"
    print(f"{what}: the same training as {name}, reused (--no-reuse trains it again)", flush=True)
    return True


def with_finished(
    suite: Suite, todo: list[Job], root: Path, data_root: Path | None, extra: list[str], own: dict[str, OwnData] | None = None
) -> list[Job]:
    """The jobs a suite's tables take after a command ran ``todo``: those, and every other
    finished run of the suite (what ``--aggregate-only`` shows), so a command run on a subset
    (``--datasets``, ``--variants``) keeps the other rows in the tables; what is listed as
    planned but missing stays the command's own selection."""
    mine = {j.run_dir for j in todo}
    every = aggregation_jobs(suite, root, data_root, extra, own=own)
    others = [j for j in every if j.run_dir not in mine and has_run_file(j.run_dir, "metrics.json")]
    return todo + others


def run_suite(suite: Suite, root: Path, data_root: Path | None, jobs: int = 1, **kw: Any) -> dict[str, Any]:
    """Run one suite's missing jobs; see :func:`run_suites`."""
    return run_suites([suite], root, data_root, jobs, **kw)[0]

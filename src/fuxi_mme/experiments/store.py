"""A suite's finished runs stored as one file instead of a folder per run.

A run trains into ``<root>/<suite>/<dataset>/<variant>/seed<k>/`` and writes ``config.json``,
``run.json`` and ``metrics.json`` there (``fuxi_mme/runs.py``). Packing a suite
(:func:`pack_runs`, run by ``logs.pack_logs``) moves those three files of every run into
``<root>/<suite>/runs.jsonl``: one line per run, sorted, ``{"run": "<dataset>/<variant>/seed<k>",
"config.json": {...}, "run.json": {...}, "metrics.json": {...}}``, the same values, so nothing is
lost and a diff shows one line per changed run. The emptied run folders are removed. Readers ask
:func:`run_file`, which takes a loose file before the suite's stored copy.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from ..utils.locks import held
from ..utils.runinfo import atomic_write_text

RUNS = "runs.jsonl"
RUN_FILES = ("config.json", "run.json", "metrics.json")
RUN_DEPTH = 3  # <suite>/<dataset>/<variant>/seed<k>

_cache: dict[Path, tuple[tuple[int, int], dict[str, dict[str, Any]]]] = {}


def _where(run_dir: Path) -> tuple[Path, str] | None:
    """The suite folder above a run folder and the run's key in that suite."""
    if len(run_dir.parents) < RUN_DEPTH:
        return None
    suite = run_dir.parents[RUN_DEPTH - 1]
    return suite, run_dir.relative_to(suite).as_posix()


def stored_runs(suite_dir: Path) -> dict[str, dict[str, Any]]:
    """Run key -> {file name: its JSON value} of a suite's ``runs.jsonl`` (read once per change)."""
    f = suite_dir / RUNS
    try:
        st = f.stat()
    except FileNotFoundError:
        return {}
    stamp = (st.st_mtime_ns, st.st_size)
    hit = _cache.get(f)
    if hit is None or hit[0] != stamp:
        runs = {}
        for line in f.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                runs[rec.pop("run")] = rec
        hit = _cache[f] = (stamp, runs)
    return hit[1]


def variant_runs(variant_dir: Path) -> list[Path]:
    """The run folders (``seed<k>``) of one variant folder ``<suite>/<dataset>/<variant>``, loose
    or packed into the suite's ``runs.jsonl``; set-aside ones (``seed<k>.stale``) left out."""
    names = {p.name for p in variant_dir.iterdir() if p.is_dir()} if variant_dir.is_dir() else set()
    where = _where(variant_dir / "seed0")
    if where is not None:
        prefix = where[1].rsplit("/", 1)[0] + "/"
        names |= {k.removeprefix(prefix) for k in stored_runs(where[0]) if k.startswith(prefix)}
    seeds = [n for n in names if n.startswith("seed") and n[4:].isdigit()]
    return [variant_dir / n for n in sorted(seeds, key=lambda n: int(n[4:]))]


def run_file(run_dir: Path, name: str) -> Any:
    """The JSON value of a run's ``name`` (config.json, run.json, metrics.json): the loose file
    when there is one, else the copy stored in its suite's ``runs.jsonl``; None if neither."""
    f = run_dir / name
    if f.is_file():
        return json.loads(f.read_text())
    where = _where(run_dir)
    if where is None:
        return None
    return stored_runs(where[0]).get(where[1], {}).get(name)


def has_run_file(run_dir: Path, name: str) -> bool:
    return run_file(run_dir, name) is not None


RUNS_LOCK = ".runs.lock"  # held while runs.jsonl is read, changed and written back (the file itself is replaced)


@contextlib.contextmanager
def _runs_writer(suite_dir: Path) -> Iterator[None]:
    """One writer of a suite's ``runs.jsonl`` at a time, across processes."""
    lock = suite_dir / RUNS_LOCK
    lock.touch(exist_ok=True)
    with held(lock, blocking=True):
        yield


def _write_runs(suite_dir: Path, runs: dict[str, dict[str, Any]]) -> None:
    lines = [json.dumps({"run": k, **{n: runs[k][n] for n in RUN_FILES if n in runs[k]}}, separators=(",", ":")) for k in sorted(runs)]
    atomic_write_text(suite_dir / RUNS, "\n".join(lines) + "\n")


def set_aside(run_dir: Path) -> Path:
    """Move a finished run out of the way of a new one, kept as ``seed<k>.stale`` until the
    next (an older ``.stale`` is replaced): its folder, and its entry in the suite's
    ``runs.jsonl``, which would otherwise still answer for ``seed<k>`` until the new run ends
    (a new ``config.json`` beside the old ``metrics.json``). Returns the new place."""
    aside = run_dir.with_name(run_dir.name + ".stale")
    if aside.exists():
        shutil.rmtree(aside)
    if run_dir.exists():
        run_dir.rename(aside)
    where = _where(run_dir)
    if where is not None and (where[0] / RUNS).exists():
        suite_dir, key = where
        with _runs_writer(suite_dir):
            runs = {k: dict(v) for k, v in stored_runs(suite_dir).items()}
            old = runs.pop(key, None)
            runs.pop(key + ".stale", None)
            if old is not None:
                runs[key + ".stale"] = old
            _write_runs(suite_dir, runs)
    return aside


def pack_runs(suite_dir: Path, skip: Collection[str] = ()) -> int:
    """Move the loose run files under a suite folder into its ``runs.jsonl`` (a loose file
    replaces its stored copy), then delete them and the run folders they leave empty; the runs
    in ``skip`` (``<dataset>/<variant>/seed<k>``, still being written) stay as they are.
    Returns the number of files moved."""
    files = (p for name in RUN_FILES for p in suite_dir.glob(f"*/*/*/{name}"))
    loose = sorted(p for p in files if p.parent.relative_to(suite_dir).as_posix() not in skip)
    if not loose:
        return 0
    with _runs_writer(suite_dir):
        runs = {k: dict(v) for k, v in stored_runs(suite_dir).items()}
        for f in loose:
            runs.setdefault(f.parent.relative_to(suite_dir).as_posix(), {})[f.name] = json.loads(f.read_text())
        _write_runs(suite_dir, runs)
    for f in loose:
        f.unlink()
    for d in sorted(
        {f.parent for f in loose} | {f.parent.parent for f in loose} | {f.parent.parent.parent for f in loose}, key=lambda p: -len(p.parts)
    ):
        if d != suite_dir and d.is_dir() and not any(d.iterdir()):
            d.rmdir()
    return len(loose)

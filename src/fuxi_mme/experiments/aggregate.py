"""Aggregation over seeds: mean and std of every (dataset, variant) of a suite, with where its
runs came from, written to ``<root>/<suite>.json`` and ``<root>/<suite>.md``.

Reads each run's ``metrics.json`` and ``run.json`` and its training seconds
(:func:`fuxi_mme.experiments.logs.train_seconds`); never the per-epoch logs' archive.
"""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from ..eval.buckets import BUCKET_NAMES
from ..utils.runinfo import atomic_write_json, atomic_write_text, git_commit
from .logs import copy_source, train_seconds
from .plan import Job, stale_changes
from .store import has_run_file, run_file
from .suites import Suite
from .tables import markdown

METRICS = ("NDCG@10", "HR@10", "NDCG@50", "HR@50", "MRR")
LOW_SEED_SHARE = 0.5  # a seed whose validation NDCG@10 is under this share of its row's median is flagged


def low_seeds(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The seeds of a row (3 or more) whose best validation NDCG@10 is under
    :data:`LOW_SEED_SHARE` of the row's median: a run that stopped learning early (e.g. stuck
    near its first epochs' level until early stopping). Flagged, never dropped: they stay in the
    mean and std, and the tables say so."""
    vals = [(float(v), r) for r in runs if isinstance(v := (r.get("valid_best") or {}).get("NDCG@10"), (int, float))]
    if len(runs) < 3 or len(vals) < len(runs):
        return []
    median = float(np.median([v for v, _ in vals]))
    return [{"seed": Path(r["run_dir"]).name, "valid NDCG@10": v, "median": median} for v, r in vals if v < LOW_SEED_SHARE * median]


# beyond-accuracy metrics (a metrics record's "beyond" part; docs/training.md#beyond-accuracy-metrics),
# aggregated where every seed of a row has them (runs from before them have none)
BEYOND_METRICS = ("Coverage@10", "Gini@10", "Novelty@10", "ILD@10")


def run_commit(info: dict[str, Any]) -> str:
    """A run's commit from its ``run.json``. Runs that did not record one (launched on a machine
    without git before ``FUXI_MME_COMMIT`` existed) are labelled with the newest commit of this
    checkout before the run started, marked as such, when git can tell."""
    if info.get("commit"):
        return str(info["commit"])
    started = info.get("started")
    if started:
        try:
            out = subprocess.run(
                ["git", "rev-list", "-1", f"--before={started}", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).resolve().parent,
            )
            if out.returncode == 0 and out.stdout.strip():
                return f"not recorded; newest earlier commit {out.stdout.strip()}"
        except (OSError, subprocess.SubprocessError):
            pass
    return "not recorded"


def _mean_std(vals: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(vals)), "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}


def _origins(done: list[Job]) -> dict[tuple[str, str], list[tuple[str, str]]]:
    """(dataset, variant) -> (commit, device) of each of its runs that has a ``run.json``."""
    origin: dict[tuple[str, str], list[tuple[str, str]]] = {}
    for job in done:
        info = run_file(job.run_dir, "run.json")
        if info is not None:
            dev = info.get("device", {})
            origin.setdefault((job.dataset, job.variant), []).append((run_commit(info), str(dev.get("gpu") or dev.get("device", "?"))))
    return origin


def _seconds(run_dir: Path) -> float | None:
    """A run's training seconds: its own (its log, its suite's index, or, for a reused run, its
    run.json), else, for a run copied from another suite's that is still the same run (the same
    metrics.json), that run's. Never the seconds of a run that has since replaced the source."""
    own = train_seconds(run_dir)
    if own is not None:
        return own
    src = copy_source(run_dir)
    return train_seconds(src) if src is not None else None


def _row(ds: str, variant: str, runs: list[dict[str, Any]], devices: list[tuple[str, str]], dirs: list[Path] | None = None) -> dict[str, Any]:
    """One table row: the seeds' metrics as mean and std, epochs, training seconds, parameters;
    ``dirs``: the runs' folders (default: those their metrics name)."""
    entry: dict[str, Any] = {
        "dataset": ds,
        "variant": variant,
        "seeds": len(runs),
        "protocol": runs[0]["protocol"],
        "runs": [r["run_dir"] for r in runs],
        "devices": sorted({d for _, d in devices}),
    }
    for split in ("test", "valid_best"):
        if all(split in r for r in runs):
            for k in METRICS:
                vals = [r[split][k] for r in runs if k in r[split]]
                if vals:
                    entry[f"{split}/{k}"] = _mean_std(vals)
            for k in BEYOND_METRICS:
                got = [(r[split].get("beyond") or {}).get(k) for r in runs]
                nums = [float(v) for v in got if isinstance(v, (int, float))]
                if len(nums) == len(runs):
                    entry[f"{split}/{k}"] = _mean_std(nums)
    for b in BUCKET_NAMES:  # test NDCG@10 per user-history-length bucket (docs/training.md#history-length-buckets)
        cells = [((r.get("test") or {}).get("buckets") or {}).get(b) or {} for r in runs]
        if all("NDCG@10" in c for c in cells):
            entry[f"test/{b}/NDCG@10"] = _mean_std([float(c["NDCG@10"]) for c in cells])
            entry[f"test/{b}/users"] = sum(int(c.get("users", 0)) for c in cells) / len(cells)
    entry["epochs"] = [r.get("selected_epoch") for r in runs]
    low = low_seeds(runs)
    if low:
        entry["low_seeds"] = low
    secs = [_seconds(d) for d in (dirs if dirs is not None else [Path(r["run_dir"]) for r in runs])]
    known = [x for x in secs if x is not None]
    if len(known) == len(secs):
        entry["train_seconds"] = _mean_std(known)
    if runs[0].get("parameters"):
        entry["parameters"] = runs[0]["parameters"]
    return entry


def _not_in_table(todo: list[Job], changes: dict[int, list[str]]) -> dict[str, list[dict[str, Any]]]:
    """The planned rows left out of the table: never run, not applicable, or made with other settings."""
    missing: dict[tuple[str, str], int] = {}
    invalid: dict[tuple[str, str], str] = {}
    stale: dict[tuple[str, str], list[str]] = {}
    for job in todo:
        key = (job.dataset, job.variant)
        if job.invalid is not None:
            invalid[key] = job.invalid
        elif changes[id(job)]:
            stale.setdefault(key, changes[id(job)])
        elif not has_run_file(job.run_dir, "metrics.json"):
            missing[key] = missing.get(key, 0) + 1
    return {
        "missing": [{"dataset": d, "variant": v, "runs": n} for (d, v), n in missing.items()],
        "stale": [{"dataset": d, "variant": v, "changes": c} for (d, v), c in stale.items()],
        "not_applicable": [{"dataset": d, "variant": v, "why": w} for (d, v), w in invalid.items()],
    }


def _counts(values: list[str]) -> dict[str, int]:
    return {v: values.count(v) for v in dict.fromkeys(values)}


def aggregate(suite: Suite, todo: list[Job], root: Path, failed: list[str], commit: str | None = None, now: str | None = None) -> dict[str, Any]:
    """Mean and std over seeds of every (dataset, variant) with results; ``<root>/<suite>.json``
    and ``.md``. ``commit``: the checkout's commit, read once before several suites are written
    (the first suite's files would otherwise make the tree look modified to the next); ``now``:
    the time to stamp (default: the current time)."""
    changes = {id(job): stale_changes(job) for job in todo}  # read each run's config once
    done = [job for job in todo if has_run_file(job.run_dir, "metrics.json") and not changes[id(job)]]
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    dirs: dict[tuple[str, str], list[Path]] = {}
    for job in done:
        rows.setdefault((job.dataset, job.variant), []).append(run_file(job.run_dir, "metrics.json"))
        dirs.setdefault((job.dataset, job.variant), []).append(job.run_dir)
    origin = _origins(done)
    every = [o for runs in origin.values() for o in runs]
    out = {
        "suite": suite.name,
        "description": suite.description,
        "commit": commit or git_commit(),
        "run_commits": _counts([c for c, _ in every]),
        "devices": _counts([d for _, d in every]),
        "time": now or time.strftime("%Y-%m-%dT%H:%M:%S"),
        "failed": failed,
        "results": [_row(ds, v, runs, origin.get((ds, v), []), dirs[(ds, v)]) for (ds, v), runs in rows.items()],
        **_not_in_table(todo, changes),
    }
    atomic_write_json(root / f"{suite.name}.json", out)
    atomic_write_text(root / f"{suite.name}.md", markdown(out))
    return out

"""``fuxi-mme report RUN_DIR...``: learning curves and a comparison table of finished runs.

Reads each run's ``config.json``, ``run.json`` and ``metrics.json``, and its per-epoch records
from its ``metrics.jsonl`` or, for a run of a suite whose logs were packed, from the suite's
``logs.tar.xz``, or, for a run copied from another suite, its source run's (:mod:`fuxi_mme.experiments.logs`);
writes into ``--out``:

* ``report.md``: one row per run (dataset, model, protocol, selection, parameters, epochs,
  throughput, test metrics, and the beyond-accuracy ones where the run has them: coverage,
  Gini, novelty, ILD @10, docs/training.md#beyond-accuracy-metrics), then per-run notes;
  numbers are copied from the files, never recomputed;
* ``curves.png``: training loss and validation NDCG@10 (or the labelled per-epoch test curve
  under ``paper``) against the epoch, one line per run;
* ``comparison.png``: test NDCG@10 and HR@10 per run as bars.

Plots need matplotlib (``pip install fuxi-mme[plots]``); without it only ``report.md`` is
written and the command says so.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..utils.runinfo import atomic_write_text
from .logs import read_records
from .store import run_file

log = logging.getLogger(__name__)

TABLE_METRICS = ("NDCG@10", "HR@10", "NDCG@50", "HR@50", "HR@200", "MRR")
BEYOND_METRICS = ("Coverage@10", "Gini@10", "Novelty@10", "ILD@10")  # from the test record's "beyond" part


class ReportError(ValueError):
    pass


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """A run folder's config, run info, final metrics (None when unfinished) and per-epoch records."""
    p = Path(run_dir)
    cfg = run_file(p, "config.json")  # loose, or stored in its suite's runs.jsonl (experiments/store.py)
    if cfg is None:
        raise ReportError(f"{p} is not a run directory (no config.json); pass folders written by `fuxi-mme train`")
    info = run_file(p, "run.json") or {}
    final = run_file(p, "metrics.json")
    return {"dir": str(p), "name": p.name, "config": cfg, "info": info, "final": final, "records": read_records(p)}


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def table(runs: list[dict[str, Any]]) -> str:
    head = ["run", "dataset", "model", "protocol", "selection", "params", "epochs", "seq/s", "device", *TABLE_METRICS, *BEYOND_METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cfg, fin, info = r["config"], r["final"] or {}, r["info"]
        test = fin.get("test") or {}  # None: validation only (eval.final_test=false, tune's trials)
        train_recs = [x for x in r["records"] if x.get("kind") == "train"]
        seq = sum(x.get("seq_per_s", 0.0) for x in train_recs) / len(train_recs) if train_recs else None
        d = info.get("device") or {}
        dev = d.get("gpu") or d.get("device", "-") if isinstance(d, dict) else d
        if not fin:
            sel = "unfinished"
        elif cfg["model"]["name"] == "popularity":
            sel = "no training (item counts)"
        else:
            sel = f"{fin.get('selection', 'unfinished')}, epoch {fin.get('selected_epoch', '-')}"
        row = [
            r["name"],
            fin.get("dataset", cfg["data"]["name"]),
            cfg["model"]["name"],
            cfg["data"]["protocol"],
            sel,
            _fmt((fin.get("parameters") or {}).get("total")),
            _fmt(fin.get("epochs_trained", len(train_recs))),
            _fmt(seq, 0) if seq else "-",
            str(dev),
            *[_fmt(test.get(m)) for m in TABLE_METRICS],
            *[_fmt((test.get("beyond") or {}).get(m)) for m in BEYOND_METRICS],
        ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def bucket_table(runs: list[dict[str, Any]]) -> str:
    """Test NDCG@10 and HR@10 per history-length bucket (eval/buckets.py), users in brackets;
    "" when no run has buckets."""
    from ..eval.buckets import BUCKET_NAMES

    have = [r for r in runs if ((r["final"] or {}).get("test") or {}).get("buckets")]
    if not have:
        return ""
    head = ["run", *[f"{b} NDCG@10 / HR@10 (users)" for b in BUCKET_NAMES]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in have:
        bk = r["final"]["test"]["buckets"]
        cells = [f"{_fmt(b.get('NDCG@10'))} / {_fmt(b.get('HR@10'))} ({b.get('users', 0):,})" if (b := bk.get(n)) else "-" for n in BUCKET_NAMES]
        lines.append("| " + " | ".join([r["name"], *cells]) + " |")
    return "\n".join(lines)


def _series(r: dict[str, Any], kind: str, key: str) -> tuple[list[int], list[float]]:
    pts = [(x["epoch"], x[key]) for x in r["records"] if x.get("kind") == kind and key in x]
    return [e for e, _ in pts], [v for _, v in pts]


def plot(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for r in runs:
        e, v = _series(r, "train", "loss")
        if e:
            axes[0].plot(e, v, marker=".", label=r["name"])
        e, v = _series(r, "valid", "NDCG@10")
        style = "-"
        if not e:
            e, v = _series(r, "test_curve", "NDCG@10")
            style = "--"
        if e:
            axes[1].plot(e, v, style, marker=".", label=r["name"] + (" (test curve, not for selection)" if style == "--" else ""))
    axes[0].set(title="training loss", xlabel="epoch", ylabel="sampled-softmax loss")
    axes[1].set(title="validation NDCG@10 (dashed: paper-protocol test curve)", xlabel="epoch", ylabel="NDCG@10")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    fig.tight_layout()
    files.append(_save(fig, out / "curves.png"))
    plt.close(fig)

    done = [r for r in runs if (r["final"] or {}).get("test")]  # tune's trials have no test metrics
    if done:
        fig, ax = plt.subplots(figsize=(max(5, 1.2 * len(done) + 2), 4))
        x = range(len(done))
        w = 0.38
        ax.bar([i - w / 2 for i in x], [r["final"]["test"].get("NDCG@10", 0) for r in done], w, label="NDCG@10")
        ax.bar([i + w / 2 for i in x], [r["final"]["test"].get("HR@10", 0) for r in done], w, label="HR@10")
        ax.set_xticks(list(x), [r["name"] for r in done], rotation=20, ha="right", fontsize=8)
        ax.set(title="test metrics (full ranking)")
        ax.legend()
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        files.append(_save(fig, out / "comparison.png"))
        plt.close(fig)
    return files


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    tmp.replace(path)
    return path


def unique_labels(paths: list[Path]) -> list[str]:
    """Each run's label: its folder's name, with as many parent folders as tell it from the
    other runs' (a suite's ``seed0`` folders become ``sasrec/seed0``, ``fuxi-alpha/seed0``)."""
    parts = [p.resolve().parts for p in paths]
    depth = [1] * len(paths)
    while True:
        labels = ["/".join(pp[-d:]) for pp, d in zip(parts, depth)]
        clash = [i for i, lab in enumerate(labels) if labels.count(lab) > 1 and depth[i] < len(parts[i])]
        if not clash:
            return labels
        for i in clash:
            depth[i] += 1


def report(run_dirs: list[str | Path], out: str | Path) -> dict[str, Any]:
    if not run_dirs:
        raise ReportError("give at least one run directory")
    runs = [read_run(d) for d in run_dirs]
    for r, name in zip(runs, unique_labels([Path(r["dir"]) for r in runs])):
        r["name"] = name
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    try:
        images = plot(runs, out)
    except ImportError:
        images = []
        log.warning("matplotlib is not installed, so no plots were drawn; pip install 'fuxi-mme[plots]'")
    md = ["# Run report", "", "Numbers copied from each run's metrics.json (test: full ranking; selection as named).", "", table(runs), ""]
    if buckets := bucket_table(runs):
        md += ["Test metrics by history length (short < 10, medium 10-49, long >= 50 events before the target):", "", buckets, ""]
    for img in images:
        md += [f"![{img.stem}]({img.name})", ""]
    for r in runs:
        notes = [*((r["info"] or {}).get("notes") or []), *(((r["final"] or {}).get("test") or {}).get("beyond") or {}).get("notes", [])]
        if not r["records"] and r["config"]["model"]["name"] != "popularity":  # a suite run whose logs.tar.xz is not here: no curves
            notes.append("no per-epoch records (an experiment suite's are on the results-logs branch: docs/results.md)")
        commit = (r["info"] or {}).get("commit")
        md.append(f"- `{r['name']}`: {r['dir']}" + (f", commit {commit}" if commit else "") + ("; " + "; ".join(notes) if notes else ""))
    atomic_write_text(out / "report.md", "\n".join(md) + "\n")
    return {"markdown": str(out / "report.md"), "images": [str(i) for i in images], "runs": len(runs)}

"""Experiment suites: grids of (dataset, variant, seed) runs, resumable, run concurrently,
aggregated over seeds into a results JSON and a Markdown table.

Each job is a normal ``fuxi-mme train`` run in its own process and folder
(``<root>/<suite>/<dataset>/<variant>/seed<k>``); a job whose ``metrics.json`` exists is
skipped, so an interrupted suite continues where it stopped. Several small jobs share one GPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .utils.runinfo import atomic_write_json, atomic_write_text, git_commit

# Variant name -> (model family, overrides). "fuxi-mme" variants start from the fuxi-mme preset.
ABLATION = {
    "fuxi-alpha": ("fuxi-alpha", []),
    "+multi-embedding": ("fuxi-mme", ["model.moe.num_experts=0"]),
    "+moe": ("fuxi-mme", ["model.num_embeddings=1", "model.qk_dim={qk_full}", "model.v_dim={qk_full}"]),
    "fuxi-mme (full)": ("fuxi-mme", []),
}
SWEEP = {
    "default": ("fuxi-mme", []),
    "M=4": ("fuxi-mme", ["model.num_embeddings=4", "model.qk_dim={qk_quarter}", "model.v_dim={qk_quarter}"]),
    "E=8": ("fuxi-mme", ["model.moe.num_experts=8"]),
    "top-1": ("fuxi-mme", ["model.moe.top_k=1"]),
    "shared expert": ("fuxi-mme", ["model.moe.shared_expert=true"]),
    "placement=u": ("fuxi-mme", ["model.moe.placement=u"]),
    "placement=out": ("fuxi-mme", ["model.moe.placement=out"]),
    "per-stream decoders": ("fuxi-mme", ["model.shared_decoder=false"]),
    "combine=mean": ("fuxi-mme", ["model.combine=mean"]),
    "aux-free balance": ("fuxi-mme", ["model.moe.balance=aux_free"]),
}
BASELINES = {
    "popularity": ("popularity", []),
    "sasrec": ("sasrec", []),
    "hstu": ("hstu", []),
    "fuxi-alpha": ("fuxi-alpha", []),
    "fuxi-mme": ("fuxi-mme", []),
}


@dataclass
class Suite:
    name: str
    datasets: list[str]
    variants: dict[str, tuple[str, list[str]]]
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    protocol: str = "loo-val"
    description: str = ""


SUITES = {
    "ablation": Suite("ablation", ["demo", "ml-100k", "amazon-beauty"], ABLATION, description="FuXi-alpha; + multi-embedding only; + MoE only; full Fuxi-MME (SPEC section 4)"),
    "sweep": Suite("sweep", ["demo", "amazon-beauty"], SWEEP, seeds=[0, 1], description="one Fuxi-MME option changed at a time, on validation"),
    "main": Suite("main", ["demo", "ml-100k", "ml-1m-ts70", "amazon-beauty", "amazon-sports", "amazon-toys"], BASELINES, description="all models, base sizes"),
}

# Where each dataset's files are, under --data-root (the layout of ../shared/data).
DATA_FOLDERS = {"ml-100k": "ml-100k", "ml-1m": "ml-1m", "ml-1m-ts70": "ml-1m", "amazon-beauty": "amazon_s3rec", "amazon-sports": "amazon_s3rec", "amazon-toys": "amazon_s3rec"}


@dataclass
class Job:
    dataset: str
    variant: str
    seed: int
    args: list[str]
    run_dir: Path


def plan(suite: Suite, root: Path, data_root: Path | None, extra: list[str], datasets: list[str] | None = None) -> list[Job]:
    from .presets import build_preset, preset_name

    jobs = []
    for ds in datasets or suite.datasets:
        base = build_preset(preset_name(ds, "fuxi-alpha", "base")).model
        fmt = {"qk_full": base.qk_dim, "qk_quarter": max(1, base.qk_dim // 4)}
        for variant, (model, over) in suite.variants.items():
            for seed in suite.seeds:
                safe = variant.replace(" ", "_").replace("(", "").replace(")", "").replace("+", "plus-").replace("=", "-")
                run_dir = root / suite.name / ds / safe / f"seed{seed}"
                args = ["train", "--preset", preset_name(ds, model, "base"), "--seed", str(seed), "--protocol", suite.protocol, "--run-dir", str(run_dir), "--no-progress"]
                if ds in DATA_FOLDERS:
                    if data_root is None:
                        raise ValueError(f"dataset {ds} needs --data-root (the folder holding {DATA_FOLDERS[ds]}/)")
                    args += ["--data-path", str(data_root / DATA_FOLDERS[ds])]
                for o in [*over, *extra]:
                    args += ["--set", o.format(**fmt)]
                jobs.append(Job(ds, variant, seed, args, run_dir))
    return jobs


def _run(job: Job, env: dict[str, str]) -> tuple[Job, int, float]:
    if (job.run_dir / "metrics.json").exists():
        return job, 0, 0.0
    if job.run_dir.exists():  # an interrupted job: start it again cleanly
        import shutil

        shutil.rmtree(job.run_dir)
    job.run_dir.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(job.run_dir.parent / f"{job.run_dir.name}.log", "w") as log:
        rc = subprocess.call([sys.executable, "-m", "fuxi_mme", *job.args], stdout=log, stderr=subprocess.STDOUT, env=env)
    return job, rc, time.perf_counter() - t0


def run_suite(suite: Suite, root: Path, data_root: Path | None, jobs: int = 1, extra: list[str] | None = None, datasets: list[str] | None = None) -> dict[str, Any]:
    todo = plan(suite, root, data_root, extra or [], datasets)
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 2) // max(jobs, 1))))
    failed = []
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for job, rc, dt in pool.map(lambda j: _run(j, env), todo):
            status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {job.run_dir}.log)"
            print(f"[{suite.name}] {job.dataset} / {job.variant} / seed {job.seed}: {status} {dt:.0f}s", flush=True)
            if rc:
                failed.append(str(job.run_dir))
    return aggregate(suite, todo, root, failed)


def aggregate(suite: Suite, todo: list[Job], root: Path, failed: list[str]) -> dict[str, Any]:
    rows: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for job in todo:
        f = job.run_dir / "metrics.json"
        if f.exists():
            rows.setdefault((job.dataset, job.variant), []).append(json.loads(f.read_text()))
    device = None
    for job in todo:
        rj = job.run_dir / "run.json"
        if rj.exists():
            device = json.loads(rj.read_text())["device"]
            break
    table = []
    for (ds, variant), runs in rows.items():
        entry: dict[str, Any] = {"dataset": ds, "variant": variant, "seeds": len(runs), "protocol": runs[0]["protocol"], "runs": [r["run_dir"] for r in runs]}
        for split in ("test", "valid_best"):
            if all(split in r for r in runs):
                for k in ("NDCG@10", "HR@10", "NDCG@50", "HR@50", "MRR"):
                    vals = np.array([r[split][k] for r in runs if k in r[split]])
                    if len(vals):
                        entry[f"{split}/{k}"] = {"mean": float(vals.mean()), "std": float(vals.std(ddof=1)) if len(vals) > 1 else 0.0}
        entry["epochs"] = [r.get("selected_epoch") for r in runs]
        params = runs[0].get("parameters")
        if params:
            entry["parameters"] = params
        table.append(entry)
    out = {"suite": suite.name, "description": suite.description, "commit": git_commit(), "device": device, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "failed": failed, "results": table}
    atomic_write_json(root / f"{suite.name}.json", out)
    atomic_write_text(root / f"{suite.name}.md", markdown(out))
    return out


def markdown(res: dict[str, Any]) -> str:
    dev = res.get("device") or {}
    lines = [f"### Suite `{res['suite']}`: {res['description']}", "", f"Commit `{res['commit']}`, device {dev.get('gpu', dev.get('device', '?'))}, {res['time']}. Mean ± std over seeds; full ranking.", ""]
    lines.append("| dataset | variant | seeds | valid NDCG@10 | test NDCG@10 | test HR@10 | test MRR | params (non-emb.) |")
    lines.append("|---|---|---|---|---|---|---|---|")
    f = lambda e, k: f"{e[k]['mean']:.4f} ± {e[k]['std']:.4f}" if k in e else "-"  # noqa: E731
    for e in res["results"]:
        p = e.get("parameters")
        params = f"{p['total']:,} ({p['non_embedding']:,})" if p else "-"
        lines.append(f"| {e['dataset']} | {e['variant']} | {e['seeds']} | {f(e, 'valid_best/NDCG@10')} | {f(e, 'test/NDCG@10')} | {f(e, 'test/HR@10')} | {f(e, 'test/MRR')} | {params} |")
    if res.get("failed"):
        lines += ["", "Failed runs: " + ", ".join(res["failed"])]
    return "\n".join(lines) + "\n"

"""Runs per hour: the real ``fuxi-mme experiment`` command on the same set of runs at several
``--jobs`` settings, each in a fresh results folder, against one run at a time
(docs/performance.md#many-runs-per-gpu).

Every setting trains the same runs (a suite's variants x datasets x seeds); runs start on the GPU
by measured memory (``experiments/packing.py``) within ``--jobs`` at once. The wall time is
measured around the command; runs per hour = finished runs / wall hours. The prepared data are
shared (a first, untimed ``data prepare`` warms the cache), the compile caches are not (each
setting has its own Inductor and Triton cache folders): each starts as a new user's sweep would.

    PYTHONPATH=src python benchmarks/runs_per_hour.py --suite main --datasets amazon-beauty \
        --variants sasrec fuxi-alpha fuxi-mme --seeds 0 1 2 3 --jobs 1 4 8 12 --mps both --data-root .gpu/data   # GPU
    PYTHONPATH=src python benchmarks/runs_per_hour.py --quick                                           # CPU smoke

Writes ``benchmarks/results/runs-per-hour-<card>.json`` and the Markdown table next to it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import RESULTS, card, save  # noqa: E402


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="main")
    ap.add_argument("--datasets", nargs="+", default=["amazon-beauty"])
    ap.add_argument("--variants", nargs="+", default=["sasrec", "fuxi-alpha", "fuxi-mme"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--jobs", nargs="+", type=int, default=[1, 4, 8, 12], help="--jobs settings to compare (1 = one at a time)")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="passed to every run")
    ap.add_argument(
        "--mps", choices=("off", "on", "both"), default="off", help="run through NVIDIA's Multi-Process Service (experiment --mps), or both ways"
    )
    ap.add_argument("--quick", action="store_true", help="the demo, two variants, 2 epochs, --jobs 1 2: a CPU smoke run")
    ap.add_argument("--work", help="folder for the data and runs (default: a temporary folder, removed)")
    ap.add_argument("--out", help="results file (default benchmarks/results/runs-per-hour-<card>.json)")
    args = ap.parse_args(argv)
    if args.quick:
        args.datasets, args.variants, args.seeds, args.jobs = ["demo"], ["sasrec", "fuxi-alpha"], [0], [1, 2]
        args.overrides = [*args.overrides, "train.epochs=2", "data.demo_users=300"]
    return args


def _experiment(args: argparse.Namespace, root: Path, data_dir: Path, jobs: int, mps: bool = False) -> tuple[float, str, int]:
    cmd = [sys.executable, "-m", "fuxi_mme", "experiment", args.suite, "--root", str(root), "--data-root", args.data_root, "--jobs", str(jobs)]
    cmd += ["--mps"] if mps else []
    cmd += ["--datasets", *args.datasets, "--variants", *args.variants, "--seeds", *map(str, args.seeds)]
    for s in args.overrides:
        cmd += ["--set", s]
    env = {**os.environ, "FUXI_MME_DATA": str(data_dir), "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
    # each setting compiles from scratch, as the first sweep of a new user does (the data's
    # compile cache would otherwise favour the settings measured later)
    env.update(TORCHINDUCTOR_CACHE_DIR=str(root / "inductor-cache"), TRITON_CACHE_DIR=str(root / "triton-cache"))
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env)
    return time.perf_counter() - t0, p.stdout + p.stderr, p.returncode


def _finished(root: Path, suite: str) -> tuple[int, dict]:
    """Finished runs of the suite under ``root`` (packed into runs.jsonl) and the device they name."""
    runs = root / suite / "runs.jsonl"
    rows = [json.loads(line) for line in runs.read_text().splitlines() if line.strip()] if runs.exists() else []
    done = [r for r in rows if r.get("metrics.json") and ".stale" not in r["run"]]
    device = done[0]["run.json"].get("device", {}) if done else {}
    return len(done), device


def _write(args: argparse.Namespace, rows: list[dict], device: dict) -> Path:
    """The results file and its table, rewritten after every setting (a run cut short keeps what it measured)."""
    base = next((r for r in rows if r["jobs"] == 1), None)
    for r in rows:
        r["vs_one_at_a_time"] = round(r["runs_per_hour"] / base["runs_per_hour"], 2) if base and base["runs_per_hour"] else None
    from fuxi_mme.utils.runinfo import git_commit, versions

    head = {"card": card({"device": device}) if device else "unknown", "commit": (git_commit() or "unknown")[:7], "versions": versions()}
    setup = {k: getattr(args, k) for k in ("suite", "datasets", "variants", "seeds", "overrides")}
    lines = [
        f"# Runs per hour ({head['card']}, commit {head['commit']})",
        "",
        f"`benchmarks/runs_per_hour.py`: `fuxi-mme experiment {args.suite}` on {', '.join(args.datasets)} x {', '.join(args.variants)} x "
        f"seeds {', '.join(map(str, args.seeds))}{' with ' + ', '.join(args.overrides) if args.overrides else ''}, a fresh results folder "
        "per setting, prepared data shared, wall time around the command.",
        "",
        "| --jobs | MPS | runs finished / planned | wall s | runs per hour | vs one at a time |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        vs = f"{r['vs_one_at_a_time']:.2f}x" if r["vs_one_at_a_time"] is not None else "-"
        mps = "on" if r["mps"] else "off"
        lines.append(f"| {r['jobs']} | {mps} | {r['runs']} / {r['planned']} | {r['wall_s']:.0f} | {r['runs_per_hour']:.1f} | {vs} |")
    out = Path(args.out) if args.out else RESULTS / f"runs-per-hour-{head['card']}.json"
    return save(out, {**head, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "setup": setup, "rows": rows, "device": device}, lines)


def main(argv: list[str] | None = None) -> Path:
    args = _parse_args(argv)
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="rph-"))
    data_dir = work / "data"
    rows: list[dict] = []
    device: dict = {}
    try:
        from fuxi_mme.experiments.plan import data_args

        for d in args.datasets:  # untimed: every setting finds the data prepared
            cmd = [sys.executable, "-m", "fuxi_mme", "data", "prepare", d, "--data-dir", str(data_dir), *data_args(d, Path(args.data_root), False)]
            for o in args.overrides:  # the runs' own data settings: the same cache entry
                cmd += ["--set", o] if o.startswith("data.") else []
            subprocess.run(cmd, capture_output=True)
        modes = {"off": [False], "on": [True], "both": [False, True]}[args.mps]
        for jobs in args.jobs:
            for mps in modes if jobs > 1 else [False]:  # one at a time has nothing to share
                root = work / f"jobs-{jobs}{'-mps' if mps else ''}"
                shutil.rmtree(root, ignore_errors=True)
                wall, log, rc = _experiment(args, root, data_dir, jobs, mps)
                done, dev = _finished(root, args.suite)
                if rc and not done:  # the command refused its arguments (an unknown variant, say): no setting would run
                    raise SystemExit(f"runs_per_hour: the experiment command failed: {log.strip().splitlines()[-1] if log.strip() else rc}")
                device = device or dev
                planned = len(args.datasets) * len(args.variants) * len(args.seeds)
                rph = round(done / wall * 3600, 1)
                rows.append({"jobs": jobs, "mps": mps, "runs": done, "planned": planned, "wall_s": round(wall, 1), "runs_per_hour": rph})
                print(f"--jobs {jobs}{' --mps' if mps else ''}: {done}/{planned} runs in {wall:.0f} s, {rph} runs/hour", flush=True)
                if done < planned:
                    print(log[-2000:], file=sys.stderr)
                _write(args, rows, device)  # after every setting: a run cut short keeps what it measured
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return _write(args, rows, device)


if __name__ == "__main__":
    print(main())

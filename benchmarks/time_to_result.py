"""Time to result: the real ``fuxi-mme train`` command, end to end, cold and warm
(docs/performance.md#time-to-result).

Each case runs the CLI as a subprocess twice with one data folder: **cold** (an empty data
folder: preparation and compilation from scratch; Inductor's and Triton's caches live under
the data folder, ``utils/runtime.py``) and **warm** (the same command again: the prepared data
and compiled artefacts are found). The wall time is measured around the process; the phases
come from the run itself (``run.json`` ``phases``: start-up, data, model, trainer setup, first
epoch with compilation and CUDA-graph capture, later epochs, evaluations, writing). What
follows the last phase is split by the process's own clock marks (``utils/exit_times.py``):
``after_run`` (leaving ``train()`` and the command), ``shutdown`` (Python joining the threads
and thread pools left running, Inductor's compile pool among them), ``exit_handlers`` (Python's
exit handlers: torch's, Inductor's compile workers') and ``teardown`` (the interpreter and CUDA
driver, up to the process's end as seen from here). Phases and these parts add up to the wall
time (checked by a test to half a second).

    PYTHONPATH=src python benchmarks/time_to_result.py --data-root ../shared/data        # ML-1M-ts70, GPU
    PYTHONPATH=src python benchmarks/time_to_result.py --quick --device cpu              # demo, a smoke run

Writes ``benchmarks/results/time-to-result-<card>.json`` and the Markdown table next to it.
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

PHASES = ("start_up", "device", "data", "model", "trainer_setup", "first_epoch", "later_epochs", "evaluations", "fit_other", "write")


def _parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", default="ml-1m-ts70-fuxi-alpha-base,ml-1m-ts70-fuxi-mme-base")
    ap.add_argument("--protocols", default="paper,loo-val")
    ap.add_argument("--data-root", default=str(ROOT.parent / "shared" / "data"), help="the folder holding ml-1m/ (the layout of ../shared/data)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.FIELD=VALUE", help="passed to every run")
    ap.add_argument("--quick", action="store_true", help="the demo data (300 users), 2 epochs: a CPU smoke run")
    ap.add_argument("--work", help="folder for the data and runs (default: a temporary folder, removed)")
    ap.add_argument("--out", help="results file (default benchmarks/results/time-to-result-<card>.json)")
    return ap.parse_args(argv)


def _source(preset: str, data_root: Path) -> list[str]:
    folders = {"ml-1m-ts70": "ml-1m", "ml-1m": "ml-1m", "ml-100k": "ml-100k", "amazon-beauty": "amazon_s3rec"}
    for name, folder in folders.items():
        if preset.startswith(name + "-"):
            return ["--source", str(data_root / folder)]
    return []


def run_case(preset: str, protocol: str, work: Path, args: argparse.Namespace) -> list[dict]:
    """The case cold, then warm; one record each."""
    data = work / f"data-{preset}-{protocol}"
    shutil.rmtree(data, ignore_errors=True)
    out = []
    for state in ("cold", "warm"):
        run_dir = work / f"run-{preset}-{protocol}-{state}"
        shutil.rmtree(run_dir, ignore_errors=True)
        cmd = [sys.executable, "-m", "fuxi_mme", "train", "--preset", preset, "--protocol", protocol, "--device", args.device]
        cmd += ["--data-dir", str(data), "--run-dir", str(run_dir), "--no-progress", *_source(preset, Path(args.data_root))]
        if args.quick:
            cmd += ["--epochs", "2", "--set", "data.demo_users=300"]
        for s in args.overrides:
            cmd += ["--set", s]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        for var in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR"):  # the run's own, under the data folder
            env.pop(var, None)
        marks = work / f"exit-{preset}-{protocol}-{state}.jsonl"
        marks.unlink(missing_ok=True)
        env["FUXI_MME_EXIT_TIMES"] = str(marks)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall, ended = time.perf_counter() - t0, time.time()
        if proc.returncode:
            raise SystemExit(f"{preset} {protocol} {state}: exit {proc.returncode}: {proc.stderr.strip().splitlines()[-1:]}")
        info = json.loads((run_dir / "run.json").read_text())
        metrics = json.loads((run_dir / "metrics.json").read_text())
        out.append(
            {
                "preset": preset,
                "protocol": protocol,
                "state": state,
                "wall_s": round(wall, 2),
                "phases": info.get("phases", {}),
                "exit": exit_split(marks, info.get("phases", {}), ended),
                "epochs": metrics.get("epochs_trained"),
                "test_ndcg10": metrics["test"]["NDCG@10"],
                "device": info.get("device", {}),
            }
        )
        print(f"{preset} {protocol} {state}: {wall:.1f} s", flush=True)
    return out


EXIT = ("after_run", "shutdown", "exit_handlers", "teardown")


def exit_split(marks: Path, phases: dict, ended: float) -> dict[str, float | None]:
    """Seconds from the run's last phase to the process's end, in three parts (module notes);
    None where a mark is missing (a platform without /proc, or a process that died)."""
    out: dict[str, float | None] = dict.fromkeys(EXIT)
    lines = marks.read_text().splitlines() if marks.exists() else []
    if not lines:
        return out
    t = json.loads(lines[-1])
    if t.get("process_start") is not None and isinstance(phases.get("total"), (int, float)) and t.get("command_end"):
        out["after_run"] = round(t["command_end"] - (t["process_start"] + phases["total"]), 3)
    if t.get("command_end") and t.get("atexit_start"):
        out["shutdown"] = round(t["atexit_start"] - t["command_end"], 3)
    if t.get("atexit_start") and t.get("atexit_end"):
        out["exit_handlers"] = round(t["atexit_end"] - t["atexit_start"], 3)
    if t.get("atexit_end"):
        out["teardown"] = round(ended - t["atexit_end"], 3)
    return out


def _markdown(rows: list[dict], head: dict) -> list[str]:
    lines = [
        f"# Time to result ({head['card']}, commit {head['commit']})",
        "",
        "`benchmarks/time_to_result.py`: `fuxi-mme train` as a subprocess, wall time around the process; cold = empty data folder "
        "(preparation, compilation), warm = the same command again. Phases (s) from the run's `run.json`; the first epoch holds "
        "compilation and CUDA-graph capture. After the last phase: after_run (leaving train() and the command), shutdown "
        "(threads and thread pools joined), exit_handlers (Python's exit handlers), teardown (interpreter and CUDA driver, to "
        "the process's end).",
        "",
        "| preset | protocol | run | wall s | epochs | " + " | ".join(PHASES + EXIT) + " | test NDCG@10 |",
        "|---|---|---|---|---|" + "---|" * len(PHASES + EXIT) + "---|",
    ]
    for r in rows:
        ph = {**r["phases"], **r.get("exit", {})}
        cells = [f"{ph[p]:.1f}" if isinstance(ph.get(p), (int, float)) else "-" for p in PHASES + EXIT]
        first = f"| {r['preset']} | {r['protocol']} | {r['state']} | {r['wall_s']:.1f} | {r['epochs']} | "
        lines.append(first + " | ".join(cells) + f" | {r['test_ndcg10']:.4f} |")
    return lines


def main(argv: list[str] | None = None) -> Path:
    args = _parse_args(argv)
    presets = ["demo-fuxi-alpha-base"] if args.quick else args.presets.split(",")
    protocols = ["loo-val"] if args.quick else args.protocols.split(",")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ttr-"))
    try:
        rows = [r for p in presets for proto in protocols for r in run_case(p, proto, work, args)]
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    from fuxi_mme.utils.runinfo import git_commit, versions

    head = {"card": card({"device": rows[0]["device"]}), "commit": (git_commit() or "unknown")[:7], "versions": versions()}
    out = Path(args.out) if args.out else RESULTS / f"time-to-result-{head['card'].replace(' ', '_')}.json"
    return save(out, {**head, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "runs": rows}, _markdown(rows, head))


if __name__ == "__main__":
    print(main())

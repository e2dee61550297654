"""Every single-machine benchmark in one command; each writes its own results files.

On a GPU machine: training throughput on every path (``throughput.py``), attention alone
(``attention.py``), the profiler breakdown (``profile_step.py``), the fused ranking against
the reference (``rank_speed.py``); with 2+ GPUs also the DDP scaling benchmark
(``ddp_scaling.py``). On a CPU-only machine: whole CPU epochs (``cpu_epoch.py``) and the
models' step arithmetic (``flops.py``, device-independent). On both: what kept bytecode saves a
command (``bytecode.py``). Each benchmark runs in its own process,
so one failure does not stop the others; the exit code is non-zero if any failed.

    PYTHONPATH=src python benchmarks/run_all.py [--data-root ../shared/data] [--dry-run]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def plan(gpus: int, data_root: str | None) -> list[list[str]]:
    py = [sys.executable]
    if gpus == 0:
        cmd = [*py, str(HERE / "cpu_epoch.py")]
        if data_root:
            cmd += ["--data-path", str(Path(data_root) / "ml-1m")]
        return [cmd, [*py, str(HERE / "flops.py")], [*py, str(HERE / "bytecode.py")]]
    runs = [
        [
            *py,
            str(HERE / "throughput.py"),
            "--shapes",
            "ml-1m",
            "ml-20m",
            "--paths",
            "fp32",
            "default",
            "default-bf16",
            "compiled-fast",
            "graph-bf16",
            "--epoch",
        ],
        [*py, str(HERE / "attention.py"), "--shapes", "ml-20m", "ml-1m"],
        [*py, str(HERE / "profile_step.py"), "--paths", "default-bf16", "compiled-fast"],
        [*py, str(HERE / "rank_speed.py")],
        [*py, str(HERE / "bytecode.py")],
    ]
    if gpus >= 2:
        runs.append([*py, str(HERE / "ddp_scaling.py")])
    return runs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-root", help="the layout of ../shared/data (CPU: the real ml-1m-ts70 epoch too)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands only")
    args = ap.parse_args()
    try:
        import torch

        gpus = torch.cuda.device_count()
    except ImportError:  # pragma: no cover - torch is a dependency
        gpus = 0
    failed = []
    for cmd in plan(gpus, args.data_root):
        print("$ " + " ".join(cmd), flush=True)
        if not args.dry_run and subprocess.call(cmd) != 0:
            failed.append(Path(cmd[1]).name)
    if failed:
        sys.exit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()

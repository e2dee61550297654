"""The one-command benchmark runner picks the right benchmarks for the machine."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from run_all import plan  # noqa: E402


def names(cmds):
    return [Path(c[1]).name for c in cmds]


def test_plan_per_machine():
    assert names(plan(0, None)) == ["cpu_epoch.py"]
    assert plan(0, "/data")[0][-2:] == ["--data-path", str(Path("/data") / "ml-1m")]
    assert names(plan(1, None)) == ["throughput.py", "attention.py", "profile_step.py"]
    assert names(plan(2, None))[-1] == "ddp_scaling.py"


def test_dry_run_prints_the_commands():
    import torch

    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "run_all.py"), "--dry-run"], capture_output=True, text=True, check=True).stdout
    ran = [Path(line.split()[2]).name for line in out.splitlines() if line.startswith("$ ")]
    assert ran == names(plan(torch.cuda.device_count(), None))


def test_throughput_table_says_what_really_ran():
    from throughput import path_label

    assert path_label({"path": "fast", "cuda_graphs_used": False, "moe_path": "padded"}) == "fast (graphs refused: eager, MoE padded)"
    assert path_label({"path": "fast", "cuda_graphs_used": True, "moe_path": "dense"}) == "fast (MoE dense)"
    assert path_label({"path": "default", "cuda_graphs_used": True, "moe_path": None}) == "default (graphs)"
    assert path_label({"path": "fp32", "cuda_graphs_used": False, "moe_path": None}) == "fp32"
    assert path_label({"path": "chunked-bf16", "cuda_graphs_used": False, "moe_path": None, "length_chunks": 4}) == "chunked-bf16 (4 length chunks)"

"""Multi-process training on CPU with gloo, through torchrun: the same trajectory as one
process with the same global batch, distributed evaluation equal to single-process
evaluation, and a clean failure when a rank dies."""

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import TINY, free_port, tiny_config
from fuxi_mme.runs import evaluate_run
from fuxi_mme.train.run import train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is unavailable"
)

OVERRIDES = {**TINY, "train.epochs": 3, "eval.batch_size": 24}


def _sets(over):
    out = []
    for k, v in over.items():
        out += ["--set", f"{k}={v}"]
    return out


def _env(tmp_path, **extra):
    env = dict(os.environ)
    src = str(Path(__file__).resolve().parents[1] / "src")
    env["PYTHONPATH"] = src + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    env.update(extra)
    return env


def _torchrun(tmp_path, run_dir, nproc=2, over=None, extra_env=None, timeout=300):
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "fuxi_mme",
        "train",
        "--preset",
        "demo-fuxi-alpha-base",
        "--run-dir",
        str(run_dir),
        *_sets(over or OVERRIDES),
    ]
    return subprocess.run(cmd, env=_env(tmp_path, **(extra_env or {})), capture_output=True, text=True, timeout=timeout)


def _losses(run_dir):
    recs = [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if r["kind"] == "train"], [r for r in recs if r["kind"] == "valid"]


@pytest.mark.parametrize("loss", ["sampled", "full"])
def test_two_gloo_processes_follow_the_single_process_trajectory(tmp_path, loss):
    torch.set_num_threads(1)
    over = {**OVERRIDES, "train.loss": loss}
    one = tmp_path / "one"
    cfg = tiny_config("fuxi-alpha", **{**over, "log.run_dir": str(one)})
    single = train(cfg)
    two = tmp_path / "two"
    p = _torchrun(tmp_path, two, over=over)
    assert p.returncode == 0, p.stderr[-3000:]
    l1, v1 = _losses(one)
    l2, v2 = _losses(two)
    assert len(l1) == len(l2) == 3
    assert l1 == pytest.approx(l2, rel=1e-4)  # same global batch, same negatives: same loss curve
    assert [v["NDCG@10"] for v in v1] == pytest.approx([v["NDCG@10"] for v in v2], abs=2e-3)
    res2 = json.loads((two / "metrics.json").read_text())
    assert res2["world_size"] == 2
    assert res2["test"]["NDCG@10"] == pytest.approx(single["test"]["NDCG@10"], abs=5e-3)
    # only rank 0 wrote: one train record per epoch, one run.json
    assert (two / "run.json").exists() and json.loads((two / "run.json").read_text())["distributed"]["world_size"] == 2
    # distributed full-ranking evaluation == single-process evaluation of the same checkpoint
    again = evaluate_run(two, split="test", checkpoint="best", device="cpu")
    assert again["test"] == res2["test"]


def test_a_dead_rank_fails_the_run_instead_of_hanging(tmp_path):
    t0 = time.time()
    p = _torchrun(tmp_path, tmp_path / "dead", extra_env={"FUXI_MME_TEST_FAIL": "1:2"}, timeout=240)
    assert p.returncode != 0
    assert time.time() - t0 < 200
    assert re.search(r"exitcode\s*:\s*3", p.stderr), p.stderr[-2000:]  # the simulated crash, not another failure
    assert len(_losses(tmp_path / "dead")[0]) == 1  # epoch 1 completed on both ranks before rank 1 died


def test_a_refused_run_folder_stops_every_rank_at_once(tmp_path):
    """Rank 0 alone creates and locks the run folder; when it refuses (a folder that holds a
    run, or one in use), every rank stops with its reason instead of waiting for rank 0 in a
    collective until the timeout."""
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "metrics.json").write_text("{}")
    t0 = time.time()
    p = _torchrun(tmp_path, taken, timeout=240)
    assert p.returncode != 0 and time.time() - t0 < 120, p.stderr[-2000:]
    assert p.stderr.count("already holds a run") >= 2, p.stderr[-2000:]  # rank 0's reason, from both ranks


def test_without_torchrun_a_surviving_rank_gets_a_clear_message(tmp_path):
    """Ranks started by hand (no torchrun agent to kill the survivors): the survivor's
    collective fails (peer gone or timeout) and the error says what probably happened."""
    port = str(free_port())
    procs = []
    for rank in (0, 1):
        env = _env(
            tmp_path, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1", MASTER_PORT=port, FUXI_MME_TEST_FAIL="1:2"
        )
        cmd = [
            sys.executable,
            "-m",
            "fuxi_mme",
            "train",
            "--preset",
            "demo-fuxi-alpha-base",
            "--run-dir",
            str(tmp_path / "manual"),
            *_sets({**OVERRIDES, "train.dist_timeout": 30}),
        ]
        procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out0 = procs[0].communicate(timeout=200)
    procs[1].communicate(timeout=60)
    assert procs[1].returncode == 3
    assert procs[0].returncode != 0
    assert "Another rank most likely crashed or hung" in out0[1], out0[1][-2000:]

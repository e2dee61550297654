"""Item tables sharded with FSDP2 (``train.shard_items``) on CPU with gloo, through torchrun:
two sharded processes follow the one-process loss curve, their checkpoints are unsharded (one
process loads them, evaluates them to the same metrics and resumes from them), and the
settings that cannot shard say so (docs/training.md#sharded-item-tables)."""

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY, tiny_config
from fuxi_mme.config import ConfigError
from fuxi_mme.data import load_dataset
from fuxi_mme.models import build_model
from fuxi_mme.runs import evaluate_run, load_run
from fuxi_mme.train import distributed as D
from fuxi_mme.train import sharding
from fuxi_mme.train.loop import Trainer
from fuxi_mme.train.run import train

pytestmark = pytest.mark.skipif(
    not torch.distributed.is_available() or not torch.distributed.is_gloo_available(), reason="torch.distributed with gloo is unavailable"
)

# 200 demo users in batches of 32: 7 steps an epoch (the last a scrap of 8 rows); evaluation
# batches of 24 give the two ranks 5 and 4 batches, so no collective may run per batch
ALPHA = {**TINY, "train.epochs": 3, "eval.batch_size": 24, "train.grad_clip": 0.5}
# one optimizer step an epoch (two micro-batches of 128 and 72 users, gradients accumulated), so
# the logged curve is the per-step curve; Fuxi-MME with 2 item tables and 4 experts; no balance
# loss, which is a mean over each rank's own tokens and so differs from one process by design
MME = {**TINY, "train.epochs": 4, "train.batch_size": 128, "train.grad_accum": 2, "eval.batch_size": 24, "model.moe.balance": "none"}


def _torchrun(run_dir: Path, preset: str, over: dict, resume: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1] / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    sets = [a for k, v in over.items() for a in ("--set", f"{k}={v}")]
    what = ["--resume", str(run_dir)] if resume else ["--preset", preset, "--run-dir", str(run_dir), *sets]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "fuxi_mme", "train", *what]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return p


def _records(run_dir: Path, kind: str) -> list[dict]:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in recs if r["kind"] == kind]


def _losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in _records(run_dir, "train")]


def _set_epochs(run_dir: Path, epochs: int, **over) -> None:
    cfg = load_run(run_dir)
    cfg.train.epochs = epochs
    for k, v in over.items():
        setattr(cfg.train, k, v)
    (run_dir / "config.json").write_text(json.dumps(cfg.to_dict()))


def test_two_sharded_processes_follow_one_process_and_their_checkpoints_are_unsharded(tmp_path):
    torch.set_num_threads(1)
    one = train(tiny_config("fuxi-alpha", **{**ALPHA, "log.run_dir": str(tmp_path / "one")}))
    two = tmp_path / "two"
    p = _torchrun(two, "demo-fuxi-alpha-base", {**ALPHA, "train.epochs": 2, "train.shard_items": True})
    # each rank holds half of the item table's rows (and their Adam moments)
    rows = re.search(r"input\.item_emb\.weight ([\d,]+) of ([\d,]+) rows", p.stderr)
    assert rows is not None, p.stderr[-2000:]
    held, total = (int(x.replace(",", "")) for x in rows.groups())
    assert held == -(-total // 2)
    assert len(_losses(tmp_path / "one")) == 3
    assert _losses(two) == pytest.approx(_losses(tmp_path / "one")[:2], rel=1e-5)
    valid_one = [r["NDCG@10"] for r in _records(tmp_path / "one", "valid")]
    assert [r["NDCG@10"] for r in _records(two, "valid")] == pytest.approx(valid_one[:2], abs=2e-3)
    # the sharded run's checkpoint is a plain one: one process loads it, same metrics
    res2 = json.loads((two / "metrics.json").read_text())
    assert evaluate_run(two, split="test", checkpoint="best", device="cpu")["test"] == res2["test"]
    # resumed sharded from its gathered weights and Adam state: the third epoch of one process
    _set_epochs(two, 3)
    _torchrun(two, "", {}, resume=True)
    assert _losses(two) == pytest.approx(_losses(tmp_path / "one"), rel=1e-5)
    assert json.loads((two / "metrics.json").read_text())["test"]["NDCG@10"] == pytest.approx(one["test"]["NDCG@10"], abs=2e-3)
    # and the sharded checkpoint resumes in one process, unsharded
    _set_epochs(two, 4)
    four = train(load_run(two), resume=two)
    assert four["epochs_trained"] == 4 and len(_losses(two)) == 4


def test_sharded_fuxi_mme_follows_the_one_process_per_step_curve(tmp_path):
    torch.set_num_threads(1)
    train(tiny_config("fuxi-mme", **{**MME, "log.run_dir": str(tmp_path / "one")}))
    p = _torchrun(tmp_path / "two", "demo-fuxi-mme-base", {**MME, "train.shard_items": True})
    assert "item_embs.0.weight" in p.stderr and "item_embs.1.weight" in p.stderr  # both tables sharded
    l1, l2 = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(l1) == len(l2) == 4 and l1[-1] < l1[0]
    assert l2 == pytest.approx(l1, rel=1e-5)
    test_one, test_two = (json.loads((tmp_path / d / "metrics.json").read_text())["test"] for d in ("one", "two"))
    assert test_two["NDCG@10"] == pytest.approx(test_one["NDCG@10"], abs=2e-3)


def _model(cfg):
    ds = load_dataset(cfg.data)
    return ds, build_model(cfg.model, ds.num_items, cfg.data.max_len)


def test_shard_items_in_one_process_is_a_logged_no_op(caplog):
    cfg = tiny_config("fuxi-alpha", **{"train.shard_items": True})
    ds, model = _model(cfg)
    with caplog.at_level(logging.INFO, logger="fuxi_mme.train.sharding"):
        tr = Trainer(cfg, ds, model, torch.device("cpu"), None)
    assert not tr.sharded
    assert [r.getMessage() for r in caplog.records] == [
        "train.shard_items: no effect in one process (it shards across torchrun ranks); training as usual"
    ]


def test_a_model_that_can_leave_parameters_without_gradients_is_refused():
    cfg = tiny_config("fuxi-mme", **{"train.shard_items": True, "model.moe.backend": "loop"})
    _, model = _model(cfg)
    with pytest.raises(ConfigError, match=r"train.shard_items=true: .*model.moe.backend=loop"):
        sharding.wanted(cfg, model, D.DistInfo(rank=0, world=2))
    cfg.train.shard_items = False
    assert not sharding.wanted(cfg, model, D.DistInfo(rank=0, world=2))

import json

import numpy as np
import pytest
import torch

from conftest import tiny_config
from fuxi_mme.cli import main
from fuxi_mme.data import load_dataset
from fuxi_mme.models import build_model
from fuxi_mme.runs import evaluate_run, load_run
from fuxi_mme.train.loop import Trainer
from fuxi_mme.train.run import train


@pytest.mark.parametrize("model", ["fuxi-alpha", "fuxi-mme", "hstu", "sasrec", "llama"])
def test_loss_falls_in_a_few_dozen_steps(model):
    torch.manual_seed(0)
    cfg = tiny_config(model)
    ds = load_dataset(cfg.data)
    net = build_model(cfg.model, ds.num_items, cfg.data.max_len)
    tr = Trainer(cfg, ds, net, torch.device("cpu"), None, progress=False)
    rows = np.arange(64)
    losses = []
    for _ in range(40):
        loss, aux = tr.loss_for_rows(rows)
        (loss + (aux if aux is not None else 0)).backward()
        tr.opt.step()
        tr.opt.zero_grad()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5])


def test_train_writes_the_run_directory_and_evaluate_reproduces_it(tmp_path):
    cfg = tiny_config("fuxi-mme", **{"log.run_dir": str(tmp_path / "run")})
    res = train(cfg)
    run = tmp_path / "run"
    for f in ("config.json", "run.json", "metrics.json", "metrics.jsonl", "checkpoints/best/model.safetensors", "checkpoints/last/optim.safetensors"):
        assert (run / f).exists(), f
    info = json.loads((run / "run.json").read_text())
    assert info["versions"]["torch"] and info["device"]["device"] == "cpu" and "commit" in info
    assert info["host_cpu_seconds"] > 0 and info["phases"]["total"] > 0  # what packing learns a run's host cores from
    assert load_run(run) == cfg
    log = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in log] == ["train", "valid", "train", "valid", "test"]
    assert "moe0/load" in log[0] and "aux_loss" in log[0]
    again = evaluate_run(run, "test", "best", "cpu")
    for k in ("HR@10", "NDCG@10", "MRR"):
        assert again["test"][k] == pytest.approx(res["test"][k], abs=1e-6)
    with pytest.raises(FileExistsError, match="already holds a run"):
        train(cfg)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(tmp_path):
    full = train(tiny_config(**{"train.epochs": 3, "log.run_dir": str(tmp_path / "a"), "model.dropout": 0.2}))
    train(tiny_config(**{"train.epochs": 1, "log.run_dir": str(tmp_path / "b"), "model.dropout": 0.2}))
    cfg = load_run(tmp_path / "b")
    cfg.train.epochs = 3
    (tmp_path / "b" / "config.json").write_text(json.dumps(cfg.to_dict()))
    resumed = train(cfg, resume=tmp_path / "b")
    assert resumed["epochs_trained"] == 3
    assert resumed["test"] == full["test"]
    assert resumed["selected_epoch"] == full["selected_epoch"]


def test_paper_protocol_reports_the_final_epoch(tmp_path):
    res = train(tiny_config(**{"data.protocol": "paper", "log.run_dir": str(tmp_path / "p"), "eval.log_test_curve": True}))
    assert res["selected_epoch"] == 2 and "valid_best" not in res
    kinds = [json.loads(x)["kind"] for x in (tmp_path / "p" / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["train", "test_curve", "train", "test_curve", "test"]


def test_demo_training_clearly_beats_popularity(tmp_path):
    over = {"data.demo_users": 800, "train.epochs": 4, "model.dim": 32, "model.qk_dim": 16, "model.v_dim": 16, "train.num_negatives": 64}
    pop = train(tiny_config("popularity", **over, **{"log.run_dir": str(tmp_path / "pop")}))
    fa = train(tiny_config("fuxi-alpha", **over, **{"log.run_dir": str(tmp_path / "fa")}))
    assert fa["test"]["NDCG@10"] > 2 * pop["test"]["NDCG@10"]
    assert fa["test"]["HR@10"] > pop["test"]["HR@10"] + 0.1


def test_cli_train_evaluate_presets_and_errors(tmp_path, capsys):
    run = tmp_path / "cli"
    args = [
        "train",
        "--model",
        "fuxi-alpha",
        "--run-dir",
        str(run),
        "--epochs",
        "1",
        "--no-progress",
        "--device",
        "cpu",
        "--set",
        "data.demo_users=150",
        "--set",
        "data.max_len=10",
        "--set",
        "model.dim=8",
        "--set",
        "model.qk_dim=8",
        "--set",
        "model.v_dim=8",
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "NDCG@10" in out and "test" in out and "loo-val" in out
    assert main(["evaluate", "--run", str(run), "--device", "cpu"]) == 0
    assert "NDCG@10" in capsys.readouterr().out
    assert main(["presets"]) == 0
    assert "ml-1m-fuxi-alpha-base" in capsys.readouterr().out
    assert main(["train", "--set", "model.nope=1"]) == 2
    assert "unknown config key 'model.nope'" in capsys.readouterr().err
    assert main(["train", "--data-path", str(tmp_path / "missing.csv")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
    assert main(["data", "info", "demo", "--set", "data.demo_users=100"]) == 0
    assert "users 100" in capsys.readouterr().out


def test_cli_trains_on_a_user_file(tmp_path, capsys):
    rng = np.random.default_rng(0)
    lines = ["uid\tmovie\twhen"] + [f"u{u}\tm{rng.integers(30)}\t{1000 + 10 * j}" for u in range(60) for j in range(8)]
    (tmp_path / "log.tsv").write_text("\n".join(lines) + "\n")
    args = [
        "train",
        "--data-path",
        str(tmp_path / "log.tsv"),
        "--run-dir",
        str(tmp_path / "r"),
        "--epochs",
        "1",
        "--no-progress",
        "--set",
        "data.user_col=uid",
        "--set",
        "data.item_col=movie",
        "--set",
        "data.time_col=when",
        "--set",
        "data.max_len=8",
        "--set",
        "model.dim=8",
        "--set",
        "model.qk_dim=4",
        "--set",
        "model.v_dim=4",
    ]
    assert main(args) == 0
    assert json.loads((tmp_path / "r" / "metrics.json").read_text())["dataset"] == "log"  # the file's stem (--name overrides)


def test_corrupt_checkpoint_is_refused(tmp_path):
    from fuxi_mme.train.checkpoint import CheckpointError

    train(tiny_config(**{"log.run_dir": str(tmp_path / "c"), "train.epochs": 1}))
    (tmp_path / "c" / "checkpoints" / "best" / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="corrupt"):
        evaluate_run(tmp_path / "c", "test", "best", "cpu")


@pytest.mark.parametrize("model", ["fuxi-mme", "hstu", "sasrec"])
def test_bf16_autocast_training_path(tmp_path, model):
    res = train(tiny_config(model, **{"train.amp": "bf16", "train.epochs": 1, "log.run_dir": str(tmp_path / model)}))
    assert 0 <= res["test"]["NDCG@10"] <= 1
    log = [json.loads(x) for x in (tmp_path / model / "metrics.jsonl").read_text().splitlines()]
    assert np.isfinite(log[0]["loss"])


def test_a_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    """A model whose outputs become NaN in epoch 2: training stops with one line naming the
    epoch (exit code 2 from the CLI), ``checkpoints/last`` still holds epoch 1 and no metric is
    written (before, NaN scores reported NDCG@10 = 1.0)."""
    from conftest import TINY
    from fuxi_mme.models.transformer import SASRec

    forward, train_epoch = SASRec.forward, Trainer.train_epoch
    epoch = {"now": 0}

    def poisoned(self, ids, ts, query_ts):
        out = forward(self, ids, ts, query_ts)
        return out * float("nan") if self.training and epoch["now"] >= 1 else out  # from epoch 2 on

    def counted(self, e):
        epoch["now"] = e
        return train_epoch(self, e)

    monkeypatch.setattr(SASRec, "forward", poisoned)
    monkeypatch.setattr(Trainer, "train_epoch", counted)
    argv = ["train", "--preset", "demo-sasrec-base", "--run-dir", str(tmp_path / "n")]
    for k, v in {**TINY, "train.epochs": 3}.items():
        argv += ["--set", f"{k}={v}"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("fuxi-mme: error: epoch 2: the training loss is nan") and "checkpoints/last still holds epoch 1" in err
    state = json.loads((tmp_path / "n" / "checkpoints" / "last" / "state.json").read_text())
    assert state["epoch"] == 1 and not (tmp_path / "n" / "metrics.json").exists()


def test_evaluate_json_is_json_alone_and_resume_names_what_it_ignores(tmp_path, capsys, caplog, monkeypatch):
    """`evaluate --json` prints only the JSON (scripts parse stdout); `train --resume` with
    options it does not apply says which; `serve --port` out of range is one line."""
    import logging

    from fuxi_mme.train.run import train

    monkeypatch.setenv("FUXI_MME_DATA", str(tmp_path / "cache"))
    run = tmp_path / "run"
    train(tiny_config("fuxi-alpha", **{"train.epochs": 1, "log.run_dir": str(run)}))
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--device", "cpu", "--json"]) == 0
    assert "NDCG@10" in json.loads(capsys.readouterr().out)["test"]
    with caplog.at_level(logging.WARNING, logger="fuxi_mme"):
        assert main(["train", "--resume", str(run), "--epochs", "1", "--lr", "0.1", "--set", "model.dim=64", "--no-progress"]) == 0
    assert "--set, --lr ignored (only --epochs, --device and --no-progress apply)" in caplog.text
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["epochs"] == 2  # the run folder says what it trained
    assert main(["serve", "--run", str(run), "--port", "99999"]) == 2
    assert "--port 99999 is not a TCP port" in capsys.readouterr().err
    assert main(["evaluate", "--run", str(run), "--checkpoint", "foo"]) == 2
    assert "--checkpoint 'foo': use best, last or auto" in capsys.readouterr().err
    import shutil

    shutil.rmtree(run / "checkpoints" / "last")
    assert main(["evaluate", "--run", str(run), "--checkpoint", "last"]) == 2
    assert "has no last checkpoint; it kept best: use --checkpoint best" in capsys.readouterr().err


def test_a_run_packed_by_an_experiment_suite_is_still_evaluated(tmp_path, capsys, monkeypatch):
    """`experiment` packs a run's config.json, run.json and metrics.json into its suite's
    runs.jsonl; the checkpoints stay. `evaluate --run` reads the packed config."""
    from fuxi_mme.train.run import train

    monkeypatch.setenv("FUXI_MME_DATA", str(tmp_path / "cache"))
    run = tmp_path / "suite" / "demo" / "fuxi-alpha" / "seed0"
    train(tiny_config("fuxi-alpha", **{"train.epochs": 1, "log.run_dir": str(run)}))
    record = {"run": "demo/fuxi-alpha/seed0", **{n: json.loads((run / n).read_text()) for n in ("config.json", "run.json", "metrics.json")}}
    (tmp_path / "suite" / "runs.jsonl").write_text(json.dumps(record) + "\n")
    for n in ("config.json", "run.json", "metrics.json"):
        (run / n).unlink()
    capsys.readouterr()
    assert main(["evaluate", "--run", str(run), "--device", "cpu", "--json"]) == 0
    assert "NDCG@10" in json.loads(capsys.readouterr().out)["test"]

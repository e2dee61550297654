"""``fuxi-mme tune``: spaces, samplers, pruning, the study folder, resuming and the winner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from fuxi_mme.cli import main
from fuxi_mme.config import ConfigError
from fuxi_mme.presets import build_preset
from fuxi_mme.tune import MedianPruner, RandomSampler, apply_params, default_space, load_space, parse_space


def test_a_space_with_a_mistake_is_refused_naming_the_field(tmp_path):
    cases = {
        "model.nope: [1, 2]": "unknown config key 'model.nope'",
        "train.lr: {low: 0.01, high: 0.001}": "train.lr needs numbers with low <= high",
        "train.lr: {low: 0, high: 0.1, log: true}": "train.lr on a log scale needs low > 0",
        "model.dim: []": "model.dim",
        "train.lr: {low: 0.001}": "train.lr must be a list of choices",
        "model.num_layers: [two]": "model.num_layers",
        "[1, 2]": "a search space is a mapping",
    }
    for i, (text, message) in enumerate(cases.items()):
        f = tmp_path / f"s{i}.yaml"
        f.write_text(text + "\n")
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
            load_space(f)
    with pytest.raises(ConfigError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")


def test_spaces_parse_ranges_and_the_defaults_cover_each_family():
    s = parse_space({"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "model.num_layers": {"low": 1, "high": 3}, "model.dim": [32, 64]}, "t")
    assert s["train.lr"].log and not s["train.lr"].integer and s["model.num_layers"].integer and s["model.dim"].choices == (32, 64)
    assert {"model.num_embeddings", "model.moe.num_experts", "model.moe.top_k"} <= set(default_space("fuxi-mme"))
    assert "model.num_embeddings" not in default_space("sasrec") and "train.lr" in default_space("fuxi-alpha")
    with pytest.raises(ConfigError, match="popularity has no hyperparameters"):
        default_space("popularity")


def test_random_samples_depend_on_seed_and_trial_number_alone_and_stay_in_range():
    space = default_space("fuxi-mme")
    a, b = RandomSampler(space, 7), RandomSampler(space, 7)
    draws = [a.ask(n) for n in range(1, 30)]
    assert draws == [b.ask(n) for n in range(1, 30)]  # a resumed study draws the same trials
    assert draws != [RandomSampler(space, 8).ask(n) for n in range(1, 30)]
    for d in draws:
        assert 2e-4 <= d["train.lr"] <= 3e-3 and 0.1 <= d["model.dropout"] <= 0.7 and 1 <= d["model.num_layers"] <= 4
        assert d["model.dim"] in (64, 128, 256) and d["model.num_embeddings"] in (2, 4, 8)
    assert len({round(d["train.lr"], 8) for d in draws}) == len(draws)


def test_median_pruner_known_answers():
    p = MedianPruner(warmup=2, min_trials=3)
    finished = [[(1, 0.1), (2, 0.2), (3, 0.3)], [(1, 0.2), (2, 0.3)], [(1, 0.05), (2, 0.1), (3, 0.4)]]
    assert not p.should_prune([(1, 0.0)], finished)  # before the warm-up
    assert p.should_prune([(1, 0.1), (2, 0.15)], finished)  # best 0.15 < median(0.2, 0.3, 0.1) = 0.2
    assert not p.should_prune([(1, 0.1), (2, 0.2)], finished)  # equal to the median: kept
    # at epoch 3 the second trial (stopped at 2) counts with its best, 0.3: median(0.3, 0.3, 0.4)
    assert p.should_prune([(1, 0.1), (2, 0.2), (3, 0.29)], finished) and not p.should_prune([(1, 0.1), (2, 0.2), (3, 0.31)], finished)
    assert not p.should_prune([(1, 0.0), (2, 0.0)], finished[:2])  # too few finished trials


def test_width_tied_fields_follow_a_sampled_width():
    base = build_preset("amazon-beauty-fuxi-alpha-base")  # d 64, 2 heads of 32
    cfg = apply_params(base, {"model.dim": 256, "train.lr": 0.002})
    assert (cfg.model.dim, cfg.model.qk_dim, cfg.model.v_dim, cfg.train.lr) == (256, 128, 128, 0.002)
    sas = apply_params(build_preset("amazon-beauty-sasrec-base"), {"model.dim": 128})
    assert sas.model.ffn_dim == 128
    mme = apply_params(build_preset("amazon-beauty-fuxi-mme-base"), {"model.moe.num_experts": 1, "model.moe.top_k": 2})
    assert mme.model.moe.top_k == 1
    assert base.model.dim == 64  # the base config is not changed


def _tune(tmp_path: Path, *extra: str) -> int:
    return main(
        [
            "tune",
            "--dataset",
            "demo",
            "--model",
            "sasrec",
            "--device",
            "cpu",
            "--epochs",
            "2",
            "--set",
            "data.demo_users=120",
            "--set",
            "train.batch_size=32",
            "--set",
            "train.num_negatives=8",
            "--set",
            "eval.ks=10",
            "--data-dir",
            str(tmp_path / "cache"),
            "--out",
            str(tmp_path / "study"),
            "--space",
            str(tmp_path / "space.yaml"),
            *extra,
        ]
    )


@pytest.mark.slow
def test_tune_end_to_end_resume_and_winner(tmp_path, capsys):
    (tmp_path / "space.yaml").write_text("train.lr: {low: 3.0e-4, high: 3.0e-3, log: true}\nmodel.dim: [16, 32]\n")
    assert _tune(tmp_path, "--trials", "2", "--parallel", "2") == 0
    out = capsys.readouterr().out
    study = tmp_path / "study"
    res = json.loads((study / "results.json").read_text())
    assert [t["state"] for t in res["trials"]] == ["complete", "complete"] and "Tuning sasrec on demo" in out
    base = build_preset("demo-sasrec-base")
    assert res["trials"][0]["params"] == {"train.lr": base.train.lr, "model.dim": base.model.dim}  # trial 0: the base config
    best = max(res["trials"], key=lambda t: t["value"])
    assert res["best"]["number"] == best["number"] and res["test"]["trial"] == best["number"] and 0 <= res["test"]["NDCG@10"] <= 1
    for n in (0, 1):  # trials never evaluate test: only the winner, once, afterwards
        trial_metrics = json.loads((study / "trials" / f"{n:03d}" / "run" / "metrics.json").read_text())
        assert trial_metrics["test"] is None and trial_metrics["valid_best"]["NDCG@10"] == res["trials"][n]["value"]
        kept = sorted(p.name for p in (study / "trials" / f"{n:03d}" / "run" / "checkpoints").iterdir())
        assert all(k.startswith("best") for k in kept) and bool(kept) == (n == best["number"])  # the winner's best checkpoint alone
    # the winner's YAML is a config `train --config` takes, with the winning values
    assert main(["train", "--config", str(study / "best.yaml"), "--print-config"]) == 0
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["model"]["dim"] == best["params"]["model.dim"] and cfg["train"]["lr"] == best["params"]["train.lr"]
    assert cfg["eval"]["final_test"] is True and cfg["data"]["protocol"] == "loo-val"
    # continue with a larger budget: finished trials are kept; an interrupted one runs again with its parameters
    seconds = [t["seconds"] for t in res["trials"]]
    with open(study / "trials.jsonl", "a") as f:
        f.write(json.dumps({"number": 2, "params": {"train.lr": 0.0005, "model.dim": 16}, "state": "running"}) + "\n")
    assert _tune(tmp_path, "--trials", "3", "--parallel", "1", "--no-test") == 0
    res = json.loads((study / "results.json").read_text())
    assert [t["seconds"] for t in res["trials"][:2]] == seconds and res["trials"][2]["state"] == "complete"
    assert res["trials"][2]["params"] == {"train.lr": 0.0005, "model.dim": 16}
    # another space in the same folder is refused, naming what differs
    (tmp_path / "space.yaml").write_text("train.lr: {low: 1.0e-4, high: 1.0e-3, log: true}\n")
    assert _tune(tmp_path, "--trials", "3") == 2
    assert "holds a study with another space" in capsys.readouterr().err


def test_a_trial_the_model_refuses_is_recorded_as_failed_and_the_study_goes_on(tmp_path):
    from fuxi_mme.tune import Budget, Study

    base = build_preset("demo-fuxi-mme-base")
    space = parse_space({"model.num_embeddings": [5]}, "t")  # 5 does not divide d = 48
    study = Study(tmp_path / "s", base, space, sampler="random")
    study._open()
    assert study._launch(1, None) is None
    t = study.trials[1]
    assert t.state == "failed" and "model.num_embeddings=5" in (t.error or "")
    assert Budget().trials == 20


def test_tune_refuses_the_paper_protocol():
    from fuxi_mme.tune import Study

    cfg = build_preset("demo-sasrec-base")
    cfg.data.protocol = "paper"
    with pytest.raises(ConfigError, match="loo-val"):
        Study("unused", cfg, default_space("sasrec"))


def test_optuna_sampler_learns_from_told_trials():
    pytest.importorskip("optuna")
    from fuxi_mme.tune.search import OptunaSampler

    space = parse_space({"train.lr": {"low": 1e-4, "high": 1e-2, "log": True}, "model.dim": [16, 32]}, "t")
    s = OptunaSampler(space, seed=0)
    s.tell(0, {"train.lr": 1e-3, "model.dim": 16}, 0.1, "complete")  # a trial of an earlier invocation
    p = s.ask(1)
    assert 1e-4 <= p["train.lr"] <= 1e-2 and p["model.dim"] in (16, 32)
    s.tell(1, p, 0.2, "complete")
    assert len(s.study.trials) == 2 and s.study.best_value == 0.2
    # trial 2 is drawn from (seed, 2) and the trials told, not from how many were asked before:
    # a study resumed after trial 1 was interrupted (rerun from its record, not asked) draws the
    # same trial 2 as one that ran through
    through = OptunaSampler(space, seed=0)
    through.tell(0, {"train.lr": 1e-3, "model.dim": 16}, 0.1, "complete")
    first = through.ask(1)
    resumed = OptunaSampler(space, seed=0)
    resumed.tell(0, {"train.lr": 1e-3, "model.dim": 16}, 0.1, "complete")
    assert through.ask(2) == resumed.ask(2) != first


@pytest.mark.slow
def test_a_killed_study_stops_its_trials_and_leaves_them_to_rerun(tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "space.yaml").write_text("train.lr: [0.001, 0.002]\n")
    argv = ["tune", "--dataset", "demo", "--model", "sasrec", "--device", "cpu", "--epochs", "200", "--set", "data.demo_users=120"]
    argv += ["--data-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "study"), "--space", str(tmp_path / "space.yaml"), "--trials", "1"]
    proc = subprocess.Popen([sys.executable, "-m", "fuxi_mme", *argv], stderr=subprocess.PIPE, text=True)
    log = tmp_path / "study" / "trials" / "000" / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (log.exists() and log.read_text().count("valid")) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert log.exists(), "the trial never started evaluating"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    records = [json.loads(line) for line in (tmp_path / "study" / "trials.jsonl").read_text().splitlines()]
    assert records[-1]["number"] == 0 and records[-1]["state"] == "running"  # rerun by the same command
    size = log.stat().st_size
    time.sleep(3)
    assert log.stat().st_size == size  # the trial's process was stopped with the study
    assert os.path.exists(tmp_path / "study" / "results.json")


def test_a_study_stops_when_the_base_config_cannot_run(tmp_path, capsys):
    """The data is prepared once before any trial: a missing file stops the study at once with one
    line, and no trial is started."""
    assert main(["tune", "--source", str(tmp_path / "missing.txt"), "--model", "sasrec", "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "s" / "trials").exists()


def test_a_spent_time_budget_starts_no_trial_and_says_how_to_continue(tmp_path, caplog):
    (tmp_path / "space.yaml").write_text("train.lr: {low: 3.0e-4, high: 3.0e-3, log: true}\n")
    with caplog.at_level("INFO"):
        assert _tune(tmp_path, "--trials", "3", "--time-budget", "0", "--no-test") == 0
    assert "time budget of 0 s spent: no new trials (3 not started; run the same command to continue)" in caplog.text
    res = json.loads((tmp_path / "study" / "results.json").read_text())
    assert res["trials"] == [] and res["best"] is None

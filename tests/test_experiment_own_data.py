"""`experiment --source FILE`: a suite on the user's own interactions file, with the defaults of
the shape measured from it (as `train --source FILE` picks them), and its rows kept by later
commands that do not name the file."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from fuxi_mme.experiments import SUITES, plan
from fuxi_mme.experiments.plan import OwnData, aggregation_jobs, own_data


def _log(path: Path, users: int, per_user: tuple[int, int]) -> Path:
    rng = random.Random(0)
    rows = ["user_id,item_id,timestamp"]
    for u in range(users):
        t = 1_600_000_000
        for _ in range(rng.randint(*per_user)):
            t += rng.randint(60, 86_400)
            rows.append(f"{u},{rng.randrange(60)},{t}")
    path.write_text("\n".join(rows) + "\n")
    return path


def test_own_files_are_named_and_measured_as_train_does_it(tmp_path):
    short = _log(tmp_path / "Clicks.csv", 200, (3, 8))
    long = _log(tmp_path / "plays.csv", 200, (30, 60))
    own = own_data([str(short), str(long)])
    assert own == {
        "clicks": OwnData("clicks", str(short.resolve()), "short"),
        "plays": OwnData("plays", str(long.resolve()), "long-few-users"),
    }
    with pytest.raises(ValueError, match="no such file"):
        own_data([str(tmp_path / "missing.csv")])


def test_a_suite_on_own_data_trains_from_the_file_with_its_shapes_defaults(tmp_path):
    own = {"clicks": OwnData("clicks", "/data/clicks.csv", "short")}
    jobs = plan(SUITES["main"], tmp_path, None, [], ["clicks"], [0], variants=["sasrec", "fuxi-alpha"], own=own)
    assert [(j.dataset, j.variant) for j in jobs] == [("clicks", "sasrec"), ("clicks", "fuxi-alpha")]
    for j in jobs:
        assert "--preset" not in j.args and j.invalid is None
        i = j.args.index("--source")
        assert j.args[i : i + 8] == ["--source", "/data/clicks.csv", "--name", "clicks", "--shape", "short", "--model", j.variant]
        # the short shape's defaults (Amazon-like: length 50, the full softmax), not a named dataset's
        assert j.planned["shape"] == "short" and j.planned["data"]["max_len"] == 50 and j.planned["train"]["loss"] == "full"
        assert j.planned["data"]["name"] == "clicks"
    assert jobs[1].planned["model"]["dim"] == 64  # the Amazon size table's base width


def test_experiment_source_runs_tabulates_and_keeps_the_rows(tmp_path, capsys):
    from fuxi_mme.cli import main

    log = _log(tmp_path / "clicks.csv", 150, (4, 10))
    root = tmp_path / "res"
    args = ["experiment", "main", "--root", str(root), "--variants", "popularity", "--seeds", "0"]
    assert main([*args, "--source", str(log)]) == 0
    out = capsys.readouterr().out
    assert "[main] clicks / popularity / seed 0: ok" in out and "| clicks | popularity | loo-val | 1 |" in out
    saved = [json.loads(line) for line in (root / "main" / "runs.jsonl").read_text().splitlines()]
    assert saved[0]["config.json"]["data"]["path"] == str(log.resolve()) and saved[0]["config.json"]["shape"] == "short"
    # a later command without --source: the row is read back from the run's config, not planned again
    assert main([*args, "--aggregate-only"]) == 0
    assert "| clicks | popularity | loo-val | 1 |" in capsys.readouterr().out
    assert [j.dataset for j in aggregation_jobs(SUITES["main"], root, None, [], variants=["popularity"]) if j.dataset == "clicks"] == ["clicks"] * 3
    # run again with --source: finished, nothing trains
    assert main([*args, "--source", str(log)]) == 0
    assert "ok" not in capsys.readouterr().out.split("### Suite")[0]


def test_experiment_source_missing_file_is_one_line(tmp_path, capsys):
    from fuxi_mme.cli import main

    assert main(["experiment", "main", "--root", str(tmp_path / "r"), "--source", str(tmp_path / "nope.csv")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"fuxi-mme: error: --source {tmp_path / 'nope.csv'}: no such file or folder"

"""`fuxi-mme report` and the determinism flag."""

import json

import pytest

from conftest import tiny_config
from fuxi_mme.cli import main
from fuxi_mme.train.run import train


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    import os

    os.environ["FUXI_MME_DATA"] = str(root / "cache")
    a = train(tiny_config("fuxi-alpha", **{"log.run_dir": str(root / "alpha")}))
    b = train(tiny_config("sasrec", **{"data.protocol": "paper", "eval.log_test_curve": True, "log.run_dir": str(root / "sasrec")}))
    return root, a, b


def test_report_writes_table_and_plots(two_runs, tmp_path, capsys):
    root, a, b = two_runs
    out = tmp_path / "rep"
    assert main(["report", str(root / "alpha"), str(root / "sasrec"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| alpha | demo | fuxi-alpha | loo-val |" in md and "| sasrec | demo | sasrec | paper |" in md
    assert f"{a['test']['NDCG@10']:.4f}" in md and f"{b['test']['NDCG@10']:.4f}" in md
    name, bk = next(iter(a["test"]["buckets"].items()))  # the per-bucket table: the run's own numbers
    assert f"{bk['NDCG@10']:.4f} / {bk['HR@10']:.4f} ({bk['users']:,})" in md and name in md
    for f in ("curves.png", "comparison.png"):
        data = (out / f).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_draws_the_curves_of_a_suite_run_from_its_logs_archive(two_runs, tmp_path):
    """A run of an experiment suite whose per-epoch logs were packed into the suite's
    logs.tar.xz: the report reads its records from there, the same as from the loose file."""
    import shutil

    from fuxi_mme.experiments.logs import pack_logs
    from fuxi_mme.experiments.report import read_run

    root, _, _ = two_runs
    run = tmp_path / "suite" / "demo" / "sasrec" / "seed0"
    shutil.copytree(root / "sasrec", run, ignore=shutil.ignore_patterns("checkpoints"))
    loose = read_run(run)["records"]
    assert pack_logs(tmp_path / "suite") == 1 and not (run / "metrics.jsonl").exists()
    assert read_run(run)["records"] == loose and any(r.get("kind") == "test_curve" for r in loose)
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0
    data = (tmp_path / "rep" / "curves.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_refuses_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--out", str(tmp_path / "o")]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_deterministic_cpu_runs_are_identical(tmp_path):
    res = []
    for name in ("a", "b"):
        cfg = tiny_config("fuxi-mme", **{"train.deterministic": True, "log.run_dir": str(tmp_path / name)})
        res.append(train(cfg))
    assert res[0]["test"] == res[1]["test"]
    la = [json.loads(x)["loss"] for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    lb = [json.loads(x)["loss"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert la == lb


def test_tensorboard_event_files_hold_the_logged_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(tiny_config("fuxi-mme", **{"log.tensorboard": True, "log.run_dir": str(tmp_path / "tb")}))
    acc = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/seq_per_s", "valid/NDCG@10", "test/NDCG@10"} <= tags
    assert len(acc.Scalars("train/loss")) == 2  # one per epoch


def test_report_takes_a_run_without_test_metrics(two_runs, tmp_path):
    """A tune trial (eval.final_test=false) has "test": null in metrics.json: reported with
    dashes, not a traceback."""
    import shutil

    root, _, _ = two_runs
    trial = tmp_path / "trial"
    shutil.copytree(root / "alpha", trial)
    m = json.loads((trial / "metrics.json").read_text())
    m["test"] = None
    (trial / "metrics.json").write_text(json.dumps(m))
    out = tmp_path / "rep"
    assert main(["report", str(root / "alpha"), str(trial), "--out", str(out)]) == 0
    assert "| trial | demo | fuxi-alpha |" in (out / "report.md").read_text()


def test_runs_of_one_folder_name_get_labels_that_tell_them_apart(two_runs, tmp_path):
    """Suite runs are all `seed0`, `seed1`, ...: the report labels each with as many parent
    folders as tell it from the others (it labelled them all `seed0`)."""
    import shutil

    from fuxi_mme.experiments.report import unique_labels

    root, _, _ = two_runs
    for model in ("alpha", "sasrec"):
        shutil.copytree(root / model, tmp_path / "suite" / "demo" / model / "seed0")
    out = tmp_path / "rep"
    assert main(["report", str(tmp_path / "suite/demo/alpha/seed0"), str(tmp_path / "suite/demo/sasrec/seed0"), "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert "| alpha/seed0 | demo | fuxi-alpha |" in md and "| sasrec/seed0 | demo | sasrec |" in md
    paths = [tmp_path / "a/x/seed0", tmp_path / "b/x/seed0", tmp_path / "c/seed1"]
    assert unique_labels(paths) == ["a/x/seed0", "b/x/seed0", "seed1"]


def test_a_popularity_run_reads_as_counts_not_unfinished(tmp_path, monkeypatch):
    monkeypatch.setenv("FUXI_MME_DATA", str(tmp_path / "cache"))
    train(tiny_config("popularity", **{"log.run_dir": str(tmp_path / "pop")}))
    assert main(["report", str(tmp_path / "pop"), "--out", str(tmp_path / "rep")]) == 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "no training (item counts)" in md and "unfinished" not in md and "no per-epoch records" not in md

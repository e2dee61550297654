import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fuxi_mme.experiments import SUITES, aggregate, config_changes, plan
from fuxi_mme.experiments.plots import series_of


class _Done:
    """A finished process as the runner sees it: a pid and an exit status."""

    def __init__(self, rc: int):
        self.rc, self.pid = rc, -1  # never a real process group

    def wait(self) -> int:
        return self.rc


def _popen_from(fake_call):
    """The runner's ``launch``, doing ``fake_call``'s work at once."""
    from fuxi_mme.experiments import runner

    return lambda job, log, env: _Done(fake_call(runner.command(job), log, None, env))


def test_plan_builds_cli_runs_with_the_variant_overrides(tmp_path):
    (tmp_path / "data" / "ml-100k").mkdir(parents=True)
    jobs = plan(SUITES["ablation"], tmp_path, tmp_path / "data", ["train.epochs=3"], ["demo", "ml-100k"])
    assert len(jobs) == 2 * 4 * 3
    moe_only = next(j for j in jobs if j.dataset == "ml-100k" and j.variant == "+moe" and j.seed == 1)
    a = moe_only.args
    assert a[a.index("--preset") + 1] == "ml-100k-fuxi-mme-base" and a[a.index("--seed") + 1] == "1"
    sets = [a[i + 1] for i, x in enumerate(a) if x == "--set"]
    assert "model.num_embeddings=1" in sets and "model.qk_dim=50" in sets and sets[-1] == "train.epochs=3"
    assert a[a.index("--data-path") + 1] == str(tmp_path / "data" / "ml-100k")
    with pytest.raises(ValueError, match="needs --data-root"):
        plan(SUITES["main"], tmp_path, None, [], ["ml-1m-ts70"])
    # a dataset whose folder is absent is left to the cache or the download
    assert "--data-path" not in plan(SUITES["main"], tmp_path, None, [], ["ml-1m"])[0].args


def test_aggregate_means_and_stds_over_seeds(tmp_path):
    suite = SUITES["ablation"]
    jobs = plan(suite, tmp_path, None, [], ["demo"])
    for j, v in zip([j for j in jobs if j.variant == "fuxi-alpha"], (0.1, 0.2, 0.3)):
        j.run_dir.mkdir(parents=True)
        m = {"NDCG@10": v, "HR@10": 2 * v, "NDCG@50": v, "HR@50": v, "MRR": v}
        metrics = {"protocol": "loo-val", "test": m, "valid_best": m, "selected_epoch": 3, "run_dir": str(j.run_dir)}
        (j.run_dir / "metrics.json").write_text(json.dumps(metrics))
        gpu = "NVIDIA H100 80GB HBM3" if v < 0.3 else "NVIDIA H200"
        (j.run_dir / "run.json").write_text(json.dumps({"commit": "abc" if v < 0.2 else None, "device": {"device": "cuda", "gpu": gpu}}))
    res = aggregate(suite, jobs, tmp_path, [])
    # each run's own commit and card are counted, not the aggregating machine's
    assert res["run_commits"] == {"abc": 1, "not recorded": 2} and res["devices"] == {"NVIDIA H100 80GB HBM3": 2, "NVIDIA H200": 1}
    assert "from runs of commits abc (1), not recorded (2) on NVIDIA H100 80GB HBM3 (2), NVIDIA H200 (1)" in (tmp_path / "ablation.md").read_text()
    (row,) = res["results"]
    assert row["seeds"] == 3 and row["test/NDCG@10"]["mean"] == pytest.approx(0.2)
    assert row["test/NDCG@10"]["std"] == pytest.approx(0.1)
    assert "| demo | fuxi-alpha | loo-val | 3 | 0.2000 ± 0.1000" in (tmp_path / "ablation.md").read_text()
    assert (tmp_path / "ablation.md").read_text().split("\n")[6].endswith("| - | H100+H200 |")  # no train times in this fake
    # the other variants were planned but have no results: listed, not silently dropped
    assert {(m["variant"], m["runs"]) for m in res["missing"]} == {(v, 3) for v in suite.variants if v != "fuxi-alpha"}
    text = (tmp_path / "ablation.md").read_text()
    others = ", ".join(f"{v} (3)" for v in suite.variants if v != "fuxi-alpha")
    assert f"Planned but not run yet (no results file; runs in parentheses): demo: {others}." in text


def test_missing_runs_are_listed_per_dataset_and_a_dataset_not_started_in_one_phrase():
    from fuxi_mme.experiments.tables import missing_line

    res = {
        "results": [{"dataset": "a", "variant": "x"}],
        "missing": [
            {"dataset": "a", "variant": "y", "runs": 3},
            {"dataset": "b", "variant": "x", "runs": 3},
            {"dataset": "b", "variant": "y", "runs": 2},
        ],
    }
    assert missing_line(res) == "Planned but not run yet (no results file; runs in parentheses): a: y (3); b: all 2 variants (5 runs)."


def test_main_suite_adds_large_sizes_and_the_paper_protocol_on_movielens(tmp_path):
    (tmp_path / "ml-1m").mkdir()
    jobs = plan(SUITES["main"], tmp_path / "r", tmp_path, [], ["ml-1m-ts70", "amazon-toys"])
    ts70 = {j.variant for j in jobs if j.dataset == "ml-1m-ts70"}
    toys = {j.variant for j in jobs if j.dataset == "amazon-toys"}
    base = {"popularity", "sasrec", "hstu", "fuxi-alpha", "fuxi-mme"}
    large = {"sasrec large", "hstu large", "fuxi-alpha large", "fuxi-mme large"}
    assert toys == base | large | {"ssm"} | {f"{m} (sampled loss)" for m in base - {"popularity"}}  # Amazon: the sampled loss as extra rows
    assert ts70 == base | large | {"ssm"} | {f"{m} (paper)" for m in base}  # the state-space model at its base size
    j = next(j for j in jobs if j.variant == "hstu (sampled loss)")
    assert j.args[j.args.index("--preset") + 1] == "amazon-toys-hstu-base" and "train.loss=sampled" in j.args
    # the Amazon presets train with the full softmax; the option-comparing suites pin the sampled loss
    from fuxi_mme.presets import build_preset

    assert build_preset("amazon-toys-fuxi-mme-base").train.loss == "full" and build_preset("ml-1m-fuxi-mme-base").train.loss == "sampled"
    for name in ("ablation", "sweep", "precision"):
        assert all("train.loss=sampled" in j.args for j in plan(SUITES[name], tmp_path / "r", None, [], ["amazon-beauty"]))
    j = next(j for j in jobs if j.variant == "fuxi-mme (paper)" and j.seed == 2)
    assert j.args[j.args.index("--protocol") + 1] == "paper" and j.args[j.args.index("--preset") + 1] == "ml-1m-ts70-fuxi-mme-base"
    j = next(j for j in jobs if j.variant == "hstu large" and j.dataset == "ml-1m-ts70")
    assert j.args[j.args.index("--preset") + 1] == "ml-1m-ts70-hstu-large"
    # Amazon large is wider (d 256), not deeper; the width suite's d=256 rows train the same config,
    # but for the large FuXi models' dropout of 0.6 and temperature of 0.07 (the dropout and
    # temperature suites' choices, made after it)
    j = next(j for j in jobs if j.variant == "fuxi-mme large" and j.dataset == "amazon-toys")
    model = j.planned["model"]
    assert (model["dim"], model["num_layers"], model["qk_dim"], model["num_embeddings"]) == (256, 2, 128, 8)

    (tmp_path / "amazon_s3rec").mkdir()
    width = {(j.variant, j.seed): j for j in plan(SUITES["width"], tmp_path / "r", tmp_path, [], ["amazon-toys"])}
    for m in ("sasrec", "fuxi-alpha", "fuxi-mme"):
        mine = next(j for j in jobs if j.variant == f"{m} large" and j.dataset == "amazon-toys" and j.seed == 0)
        chosen = [] if m == "sasrec" else ["model.dropout: 0.5 -> 0.6", "train.temperature: 0.05 -> 0.07"]
        assert config_changes(mine.planned, width[(f"{m} d=256", 0)].planned) == chosen
    assert len({j.run_dir for j in jobs}) == len(jobs)


def test_jobs_go_to_the_least_loaded_gpu_longest_first(tmp_path, monkeypatch):
    import threading
    import time as _time

    from fuxi_mme.experiments import runner
    from fuxi_mme.experiments.tables import markdown

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2")
    lock, running, peak, order = threading.Lock(), {}, {}, []

    def fake_run(job, env, stopping=None):
        with lock:
            running[job.gpu] = running.get(job.gpu, 0) + 1
            peak[job.gpu] = max(peak.get(job.gpu, 0), running[job.gpu])
            order.append((job.dataset, job.variant))
        _time.sleep(0.01 if job.seed else 0.05)  # uneven lengths: a fixed rotation would pile jobs up
        with lock:
            running[job.gpu] -= 1
        return job, 0, 0.0

    monkeypatch.setattr(runner, "run_job", fake_run)
    res = runner.run_suites([SUITES["ablation"], SUITES["sweep"]], tmp_path, None, jobs=4, datasets=["demo", "ml-100k"])
    assert [r["suite"] for r in res] == ["ablation", "sweep"]
    # M=4 cannot split ml-100k's width of 50: never started, listed as not applicable
    assert len(order) == 4 * 2 * 3 + 10 * 2 * 2 - 2 and ("ml-100k", "M=4") not in order
    assert [m["variant"] for m in res[1]["not_applicable"]] == ["M=4"] and "divide model.dim=50" in res[1]["not_applicable"][0]["why"]
    assert "Not applicable (never run): ml-100k / M=4" in markdown(res[1])
    # 4 at once over 3 GPUs: never 3 on one GPU while another is idle
    assert set(peak) == {"0", "1", "2"} and max(peak.values()) == 2
    # longest first: all 30 ml-100k runs (12 ablation, 18 sweep) start before any demo run
    assert [ds for ds, _ in order] == ["ml-100k"] * 30 + ["demo"] * 32


def test_job_cost_ranks_large_and_deep_runs_first(tmp_path):
    from fuxi_mme.experiments import job_cost, plan

    jobs = {j.variant: j for j in plan(SUITES["scaling"], tmp_path, tmp_path, [], check_data=False, seeds=[0])}
    assert job_cost(jobs["fuxi-alpha L=8"]) == 4 * job_cost(jobs["fuxi-alpha L=2"])
    assert job_cost(jobs["fuxi-mme E=16"]) > job_cost(jobs["fuxi-mme E=4"]) > job_cost(jobs["fuxi-alpha L=2"])
    main = {(j.dataset, j.variant): j for j in plan(SUITES["main"], tmp_path, tmp_path, [], check_data=False, seeds=[0])}
    assert job_cost(main["ml-1m-ts70", "fuxi-mme large"]) > job_cost(main["ml-1m-ts70", "fuxi-mme"]) > job_cost(main["amazon-beauty", "fuxi-mme"])


def test_results_doc_has_the_headline_and_the_scaling_plot(tmp_path):
    from fuxi_mme.experiments import write_docs

    def fake(suite, variants):
        jobs = plan(SUITES[suite], tmp_path, tmp_path, [], ["ml-100k"], seeds=[0, 1], check_data=False)
        for j in jobs:
            if j.variant not in variants:
                continue
            j.run_dir.mkdir(parents=True)
            v = variants[j.variant] + 0.01 * j.seed
            m = {"NDCG@10": v, "HR@10": v, "NDCG@50": v, "HR@50": v, "MRR": v}
            protocol = "paper" if "paper" in j.variant else "loo-val"
            (j.run_dir / "metrics.json").write_text(
                json.dumps(
                    {
                        "protocol": protocol,
                        "test": m,
                        "selected_epoch": 1,
                        "run_dir": str(j.run_dir),
                        "parameters": {"total": 1000, "non_embedding": 100},
                    }
                )
            )
            (j.run_dir / "metrics.jsonl").write_text(json.dumps({"kind": "train", "epoch_seconds": 2.5}) + "\n")
        return aggregate(SUITES[suite], jobs, tmp_path, [])

    fake("main", {"popularity": 0.05, "sasrec": 0.10, "fuxi-mme": 0.12, "fuxi-mme (paper)": 0.2})
    fake("scaling", {"fuxi-alpha L=2": 0.1, "fuxi-alpha L=4": 0.11, "fuxi-mme E=4": 0.12, "fuxi-mme E=8": 0.13, "fuxi-mme shipped E=4": 0.14})
    doc = write_docs(tmp_path, tmp_path / "docs" / "results.md").read_text()
    assert "| ml-100k | 0.0550 ± 0.0071 (2) | 0.1050 ± 0.0071 (2) | - | - | **0.1250 ± 0.0071 (2)** |" in doc
    assert "![scaling](scaling.png)" in doc and (tmp_path / "docs" / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    assert "| ml-100k | fuxi-mme (paper) | paper | 2 |" in doc


def test_main_suite_runs_unchanged_on_the_official_file_layouts(tmp_path, capsys):
    """ML-1M, ML-20M and KuaiRand are not in ../shared/data: the same suite is pointed at
    folders in their official layouts (tiny fixtures here) and runs end to end."""
    import pandas as pd

    from fuxi_mme.cli import main

    root = tmp_path / "data"
    rows = [(u, i, (u + i) % 5 + 1, 978300000 + 1000 * u + 10 * i) for u in range(1, 31) for i in range(1, 13) if (u * i) % 3]
    (root / "ml-1m").mkdir(parents=True)
    (root / "ml-1m" / "ratings.dat").write_text("".join(f"{u}::{i}::{r}::{t}\n" for u, i, r, t in rows))
    (root / "ml-20m").mkdir()
    pd.DataFrame(rows, columns=["userId", "movieId", "rating", "timestamp"]).to_csv(root / "ml-20m" / "ratings.csv", index=False)
    (root / "KuaiRand-Pure" / "data").mkdir(parents=True)
    kr = pd.DataFrame(
        [(u, 100 + i, 20220408, 1200, t * 1000, 1) for u, i, _, t in rows], columns=["user_id", "video_id", "date", "hourmin", "time_ms", "is_click"]
    )
    kr.to_csv(root / "KuaiRand-Pure" / "data" / "log_standard_4_08_to_4_21_pure.csv", index=False)
    args = [
        "experiment",
        "main",
        "--root",
        str(tmp_path / "res"),
        "--data-root",
        str(root),
        "--datasets",
        "ml-1m",
        "ml-20m",
        "kuairand-pure",
        "--variants",
        "fuxi-mme",
        "fuxi-mme (paper)",
        "--seeds",
        "0",
        "--jobs",
        "2",
        "--set",
        "train.epochs=1",
        "--set",
        "data.max_len=16",
        "--set",
        "train.device=cpu",
        "--set",
        "data.data_dir=" + str(tmp_path / "cache"),
    ]
    assert main(args) == 0, capsys.readouterr()
    assert SUITES["main"].seeds == [0, 1, 2] and SUITES["main"].model_seeds["fuxi-mme"] == [0, 1, 2, 3, 4]  # --seeds did not change the suite
    res = json.loads((tmp_path / "res" / "main.json").read_text())
    assert {e["seeds"] for e in res["results"]} == {1}
    got = {(e["dataset"], e["variant"], e["protocol"]) for e in res["results"]}
    assert got == {(d, v, p) for d in ("ml-1m", "ml-20m", "kuairand-pure") for v, p in (("fuxi-mme", "loo-val"), ("fuxi-mme (paper)", "paper"))}
    assert "## Headline" in (tmp_path / "res" / "results.md").read_text()
    # the runs' per-epoch logs went into the suite's archive; their training seconds stay in the tables
    assert (tmp_path / "res" / "main" / "logs.tar.xz").is_file() and not list((tmp_path / "res").rglob("metrics.jsonl"))
    assert all(e["train_seconds"]["mean"] > 0 for e in res["results"])


def test_a_run_without_a_recorded_commit_is_labelled_with_the_newest_earlier_one():
    import subprocess

    from fuxi_mme.experiments.aggregate import run_commit
    from fuxi_mme.experiments.tables import short_hashes

    assert run_commit({"commit": "abc"}) == "abc"
    assert run_commit({"commit": None}) == "not recorded"
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent)
    if head.returncode != 0:
        pytest.skip("not a git checkout")
    import time as _time

    tomorrow = _time.strftime("%Y-%m-%dT%H:%M:%S", _time.localtime(_time.time() + 86400))
    assert run_commit({"commit": None, "started": tomorrow}) == f"not recorded; newest earlier commit {head.stdout.strip()}"
    assert run_commit({"commit": None, "started": "1990-01-01T00:00:00"}) == "not recorded"  # before the first commit
    assert short_hashes(f"not recorded; newest earlier commit {'a' * 40}") == f"not recorded; newest earlier commit {'a' * 10}"


def test_suites_measured_around_the_first_defaults_pin_them(tmp_path):
    """Sweep, scaling, precision, loss, capacity: their Fuxi-MME runs keep the first defaults
    (two streams, heads and experts at width d/M, one shared decoder) whatever the presets ship;
    FuXi-alpha runs in the same suites are untouched."""
    from fuxi_mme.config import apply_overrides
    from fuxi_mme.presets import build_preset

    cases = (
        ("sweep", "ml-1m-ts70"),
        ("scaling", "ml-1m-ts70"),
        ("precision", "amazon-beauty"),
        ("loss", "amazon-toys"),
        ("capacity", "amazon-sports"),
    )
    for name, ds in cases:
        for j in plan(SUITES[name], tmp_path, tmp_path, [], [ds], seeds=[0], check_data=False):
            if j.invalid:  # M=4 on a width of 50
                continue
            m = j.planned["model"]
            at_first_defaults = j.variant in ("default", "first default", "fuxi-mme E=4", "fuxi-mme L=2") or (
                name in ("precision", "loss") and j.variant.startswith("fuxi-mme ")
            )
            if at_first_defaults:
                first = (2, build_preset(f"{ds}-fuxi-alpha-base").model.qk_dim, 1.0, True)
                assert (m["num_embeddings"], m["qk_dim"] * 2, m["ffn_multiply"], m["shared_decoder"]) == first, (name, j.variant)
            if m["name"] == "fuxi-alpha":
                assert "model.num_embeddings=2" not in j.args
    # the ablation and the main suite follow the presets
    ablation = plan(SUITES["ablation"], tmp_path, tmp_path, [], ["amazon-beauty"], seeds=[0], check_data=False)
    (full,) = [j for j in ablation if j.variant == "fuxi-mme (full)"]
    assert full.planned["model"]["num_embeddings"] == 8
    preset = build_preset("amazon-beauty-fuxi-mme-base")
    assert full.planned == apply_overrides(preset, ["train.seed=0", "data.protocol=loo-val", "train.loss=sampled"]).to_dict()


def test_scaling_shipped_series_follows_the_ml1m_preset(tmp_path):
    """The "fuxi-mme shipped" series sweeps depth and experts with the preset's decoder: its L=2
    and E=4 train exactly the main suite's Fuxi-MME base config, L=8 only changes the depth."""
    jobs = {j.variant: j for j in plan(SUITES["scaling"], tmp_path, tmp_path, [], seeds=[0], check_data=False)}
    (main,) = [j for j in plan(SUITES["main"], tmp_path, tmp_path, [], ["ml-1m-ts70"], seeds=[0], check_data=False) if j.variant == "fuxi-mme"]
    assert jobs["fuxi-mme shipped L=2"].planned == jobs["fuxi-mme shipped E=4"].planned == main.planned
    assert main.planned["model"]["shared_decoder"] is False and main.planned["model"]["ffn_multiply"] == 4.0
    deep = jobs["fuxi-mme shipped L=8"].planned
    assert deep["model"].pop("num_layers") == 8 and main.planned["model"].pop("num_layers") == 2 and deep["model"] == main.planned["model"]
    wide = jobs["fuxi-mme shipped E=16"].planned["model"]["moe"]
    assert (wide["num_experts"], wide["top_k"]) == (16, 2)
    assert jobs["fuxi-mme shipped E=1"].planned["model"]["moe"]["top_k"] == 1
    # the plot draws it as its own series, not with the first defaults' "fuxi-mme"
    names = (series_of("fuxi-mme shipped L=4", "L="), series_of("fuxi-mme L=4", "L="), series_of("fuxi-alpha+moe E=16", "E="))
    assert names == ("fuxi-mme shipped", "fuxi-mme", "fuxi-alpha+moe")


def test_sports_and_dropout_suites_pin_their_dropout_and_main_trains_the_chosen_one(tmp_path):
    """The `sports` suite stays at the large preset as it was (dropout 0.5) and changes one option
    per row; the `dropout` rows train their own value; the main suite's large rows train the
    chosen 0.6 (FuXi-alpha, Fuxi-MME, HSTU), so its seeds 0-2 are the dropout suite's 0.6 runs."""

    def planned(suite, ds="amazon-sports"):
        return {j.variant: j.planned for j in plan(SUITES[suite], tmp_path, tmp_path, [], [ds], seeds=[0], check_data=False)}

    sports, drop, main = planned("sports"), planned("dropout"), planned("main")
    assert sports["fuxi-mme large"]["model"]["dropout"] == sports["fuxi-alpha large"]["model"]["dropout"] == 0.5
    assert sports["fuxi-mme large, dropout 0.6"]["model"]["dropout"] == 0.6
    assert config_changes(sports["fuxi-mme large, L=3"], sports["fuxi-mme large"]) == ["model.num_layers: 2 -> 3"]  # (planned, saved)
    assert config_changes(sports["fuxi-mme large"], drop["fuxi-mme large, dropout 0.5"]) == []
    assert config_changes(main["hstu large"], drop["hstu large, dropout 0.6"]) == []
    assert config_changes(main["sasrec large"], drop["sasrec large, dropout 0.5"]) == []
    # both suites keep the published temperature whatever the presets say (the temperature suite chose 0.07)
    assert {p["train"]["temperature"] for p in [*sports.values(), *drop.values()]} == {0.05}
    for m in ("fuxi-alpha", "fuxi-mme"):
        assert config_changes(main[f"{m} large"], drop[f"{m} large, dropout 0.6"]) == ["train.temperature: 0.05 -> 0.07"]


def test_temperature_suite_pins_dropout_and_main_trains_the_chosen_temperature(tmp_path):
    """The `temperature` rows train their own T at their family's large dropout; the main suite's
    large FuXi-alpha and Fuxi-MME rows are its T 0.07 runs and HSTU / SASRec large its T 0.05 runs
    (which are also the dropout suite's chosen runs)."""
    for ds in ("amazon-beauty", "amazon-sports", "amazon-toys"):
        jobs = plan(SUITES["temperature"], tmp_path, tmp_path, [], [ds], seeds=[0], check_data=False)
        temp = {j.variant: j.planned for j in jobs}
        main = {j.variant: j.planned for j in plan(SUITES["main"], tmp_path, tmp_path, [], [ds], seeds=[0], check_data=False)}
        for v, p in temp.items():
            assert p["train"]["temperature"] == float(v.rsplit(" ", 1)[1])
            assert p["model"]["dropout"] == (0.5 if v.startswith("sasrec") else 0.6)
        for m in ("fuxi-alpha", "fuxi-mme"):
            assert config_changes(main[f"{m} large"], temp[f"{m} large, T 0.07"]) == []
            assert config_changes(main[f"{m} large"], temp[f"{m} large, T 0.05"]) == ["train.temperature: 0.05 -> 0.07"]
        for m in ("hstu", "sasrec"):
            assert config_changes(main[f"{m} large"], temp[f"{m} large, T 0.05"]) == []


def test_main_runs_five_seeds_for_the_compared_models_and_seeds_overrides_them(tmp_path):
    jobs = plan(SUITES["main"], tmp_path, tmp_path, [], ["amazon-toys"], check_data=False)
    seeds = {}
    for j in jobs:
        seeds.setdefault(j.variant, []).append(j.seed)
    assert seeds["fuxi-mme"] == seeds["fuxi-alpha large"] == seeds["fuxi-mme (sampled loss)"] == [0, 1, 2, 3, 4]
    assert seeds["sasrec"] == seeds["hstu large"] == seeds["popularity"] == [0, 1, 2]
    assert {j.seed for j in plan(SUITES["main"], tmp_path, tmp_path, [], ["amazon-toys"], seeds=[7], check_data=False)} == {7}


def _finish(run_dir, cfg: dict, ndcg: float = 0.1) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    m = {"NDCG@10": ndcg, "HR@10": ndcg, "NDCG@50": ndcg, "HR@50": ndcg, "MRR": ndcg}
    metrics = {"protocol": "loo-val", "test": m, "valid_best": m, "selected_epoch": 1, "run_dir": str(run_dir)}
    (run_dir / "metrics.json").write_text(json.dumps(metrics))
    (run_dir / "config.json").write_text(json.dumps(cfg))


def test_config_changes_name_what_a_finished_run_trained_differently():
    import copy

    from fuxi_mme.experiments import config_changes

    (job,) = [j for j in plan(SUITES["ablation"], Path("r"), None, [], ["demo"], seeds=[1]) if j.variant == "fuxi-mme (full)"]
    saved = copy.deepcopy(job.planned)
    # how it ran is not what it trained: paths, kernels, compile, graphs, logging
    saved["data"]["path"], saved["model"]["attention"], saved["train"]["compile"] = "/elsewhere", "fused", True
    saved["log"]["run_dir"] = "/somewhere/else"
    saved["model"]["use_temporal"] = False  # switched off by the run: its data had no timestamps
    del saved["train"]["cuda_graphs"]  # older runs did not record newer fields: their defaults
    assert config_changes(job.planned, saved) == []
    saved["model"]["qk_dim"] = 12
    saved["train"]["lr"] = 0.002
    assert config_changes(job.planned, saved) == ["model.qk_dim: 12 -> 24", "train.lr: 0.002 -> 0.001"]
    del saved["train"]["loss"]  # not recorded: the default (sampled), which this plan asks for
    saved["train"]["lr"], saved["model"]["qk_dim"] = 0.001, 24
    assert config_changes(job.planned, saved) == []
    planned_full = copy.deepcopy(job.planned)
    planned_full["train"]["loss"] = "full"
    assert config_changes(planned_full, saved) == ["train.loss: 'sampled' -> 'full'"]
    # popularity trains nothing: only its data and evaluation settings count
    (pop,) = [j for j in plan(SUITES["main"], Path("r"), None, [], ["ml-100k"], seeds=[0]) if j.variant == "popularity"]
    other = copy.deepcopy(pop.planned)
    other["train"]["loss"], other["model"]["dim"] = "full", 7
    assert config_changes(pop.planned, other) == []
    other["data"]["max_len"] = 20
    assert config_changes(pop.planned, other) == ["data.max_len: 20 -> 200"]


def test_a_run_made_with_other_settings_is_left_out_then_run_again(tmp_path, monkeypatch):
    """A preset default changed after a run finished: the tables leave the run out and say why;
    running the suite again moves it aside (seed<k>.stale) and trains the planned config."""
    import copy

    from fuxi_mme.experiments import runner

    suite = SUITES["ablation"]
    jobs = plan(suite, tmp_path, None, [], ["demo"], seeds=[0])
    for j in jobs:
        cfg = copy.deepcopy(j.planned)
        if j.variant == "fuxi-mme (full)":
            cfg["model"]["qk_dim"] = cfg["model"]["v_dim"] = 48  # made before the default changed
        _finish(j.run_dir, cfg, 0.5)
    res = aggregate(suite, plan(suite, tmp_path, None, [], ["demo"], seeds=[0]), tmp_path, [])
    assert {e["variant"] for e in res["results"]} == set(suite.variants) - {"fuxi-mme (full)"}
    assert res["stale"] == [{"dataset": "demo", "variant": "fuxi-mme (full)", "changes": ["model.qk_dim: 48 -> 24", "model.v_dim: 48 -> 24"]}]
    assert "Left out, trained with settings the suite no longer asks for" in (tmp_path / "ablation.md").read_text()
    from fuxi_mme.experiments.logs import pack_logs

    pack_logs(tmp_path / "ablation")  # as committed: the runs stored in runs.jsonl, no run folders
    assert not any(j.run_dir.exists() for j in jobs)

    started = []

    def fake_call(args, stdout, stderr, env):
        run_dir = Path(args[args.index("--run-dir") + 1])
        started.append(run_dir)
        planned = next(j for j in jobs if j.run_dir == run_dir).planned
        _finish(run_dir, planned, 0.7)
        return 0

    monkeypatch.setattr(runner, "launch", _popen_from(fake_call))
    (res,) = runner.run_suites([suite], tmp_path, None, jobs=2, datasets=["demo"], seeds=[0])
    full = next(j for j in jobs if j.variant == "fuxi-mme (full)")
    assert started == [full.run_dir]  # the others are what the plan asks for: kept
    aside = full.run_dir.with_name("seed0.stale")
    from fuxi_mme.experiments.store import run_file

    assert run_file(aside, "config.json")["model"]["qk_dim"] == 48  # kept (packed into the suite's runs.jsonl)
    assert run_file(full.run_dir, "config.json")["model"]["qk_dim"] == 24 and not full.run_dir.exists()
    row = next(e for e in res["results"] if e["variant"] == "fuxi-mme (full)")
    assert row["test/NDCG@10"]["mean"] == pytest.approx(0.7) and res["stale"] == []


@pytest.mark.parametrize("rerun, want", [("without-beyond", {"fuxi-alpha"}), ("all", {"fuxi-alpha", "fuxi-mme (full)"})])
def test_rerun_trains_finished_runs_again_and_the_tables_take_the_new_ones(tmp_path, monkeypatch, rerun, want):
    """--rerun without-beyond: only runs made before the beyond-accuracy metrics; --rerun all:
    every selected finished run. The old folders are kept as seed<k>.stale."""
    from fuxi_mme.experiments import runner

    suite = SUITES["ablation"]
    keep = ["fuxi-alpha", "fuxi-mme (full)"]
    jobs = plan(suite, tmp_path, None, [], ["demo"], seeds=[0], variants=keep)
    for j in jobs:
        _finish(j.run_dir, j.planned, 0.5)
    full = next(j for j in jobs if j.variant == "fuxi-mme (full)")
    m = json.loads((full.run_dir / "metrics.json").read_text())
    m["test"]["beyond"] = {"Coverage@10": 0.3}
    (full.run_dir / "metrics.json").write_text(json.dumps(m))
    started = []

    def fake_call(args, stdout, stderr, env):
        run_dir = Path(args[args.index("--run-dir") + 1])
        started.append(next(j.variant for j in jobs if j.run_dir == run_dir))
        _finish(run_dir, next(j for j in jobs if j.run_dir == run_dir).planned, 0.7)
        return 0

    monkeypatch.setattr(runner, "launch", _popen_from(fake_call))
    (res,) = runner.run_suites([suite], tmp_path, None, jobs=1, datasets=["demo"], seeds=[0], variants=keep, rerun=rerun)
    assert set(started) == want
    from fuxi_mme.experiments.store import run_file

    for j in jobs:  # the old run kept beside the new one (packed into the suite's runs.jsonl)
        aside = run_file(j.run_dir.with_name("seed0.stale"), "metrics.json")
        assert (aside is not None and aside["test"]["NDCG@10"] == 0.5) == (j.variant in want)
    rows = {e["variant"]: e["test/NDCG@10"]["mean"] for e in res["results"]}
    assert rows == {v: (0.7 if v in want else 0.5) for v in keep} and res["stale"] == []
    (again,) = runner.run_suites([suite], tmp_path, None, jobs=1, datasets=["demo"], seeds=[0], variants=keep)
    assert set(started) == want  # without --rerun nothing trains again


def test_welch_reading_and_the_published_target():
    """Welch's t and its degrees of freedom match a hand computation; the reading needs the 5%
    two-sided critical value of those degrees of freedom (rounded down); the published target
    needs a one-sample test against the quoted figure."""
    from fuxi_mme.experiments.stats import reading, t_critical, welch
    from fuxi_mme.experiments.tables import equal_size_comparison, published_comparison

    a, b = {"mean": 0.0306, "std": 0.0003}, {"mean": 0.0277, "std": 0.0010}
    t, df = welch(a, 3, b, 3)
    va, vb = 0.0003**2 / 3, 0.0010**2 / 3
    assert t == pytest.approx(0.0029 / (va + vb) ** 0.5) and df == pytest.approx((va + vb) ** 2 / (va**2 / 2 + vb**2 / 2))
    assert t_critical(2.36) == 4.303 and t_critical(3.99) == 3.182 and t_critical(1000) == 2.042 and t_critical(0.5) == 12.706
    assert reading(t, df) == "ahead" and reading(-t, df) == "behind" and reading(3.1, 3.99) == "level" and reading(3.2, 4.0) == "ahead"
    assert welch({"mean": 1.0, "std": 0.0}, 3, {"mean": 1.0, "std": 0.0}, 3)[0] == 0.0

    def e(ds, v, mean, std):
        protocol = "paper" if "paper" in v else "loo-val"
        return {"dataset": ds, "variant": v, "protocol": protocol, "seeds": 3, "test/NDCG@10": {"mean": mean, "std": std}}

    res = {
        "results": [
            e("amazon-toys", "fuxi-alpha", 0.0577, 0.0006),
            e("amazon-toys", "fuxi-mme", 0.0578, 0.0005),
            e("amazon-toys", "fuxi-alpha large", 0.0552, 0.0003),
            e("amazon-toys", "fuxi-mme large", 0.0600, 0.0001),
            e("amazon-toys", "fuxi-mme (sampled loss)", 0.09, 0.0),
            e("amazon-toys", "fuxi-alpha (sampled loss)", 0.05, 0.001),
            e("amazon-toys", "sasrec large", 0.0610, 0.0002),
            e("amazon-toys", "fuxi-mme d=256", 0.5, 0.0),
            e("amazon-beauty", "fuxi-mme", 0.0533, 0.0030),
        ]
    }
    table = equal_size_comparison(res)
    assert "| amazon-toys | base | loo-val |" in table and table.count("| level |") == 1
    assert "| amazon-toys | large | loo-val |" in table and "| ahead |" in table
    assert "| amazon-toys | base, train.loss=sampled | loo-val | 0.0500 ± 0.0010 (3) | 0.0900 ± 0.0000 (3) |" in table
    assert "d=256" not in table and "amazon-beauty" not in table  # other labels; no FuXi-alpha to compare with
    pub = published_comparison(res)
    assert "| amazon-toys | 0.0580 / 0.0450 / 0.0437 | base | 0.0578 ± 0.0005 | fuxi-mme 0.0578 | no |" in pub
    assert "| large | 0.0600 ± 0.0001 | sasrec large 0.0610 | yes, beyond seed noise |" in pub
    assert "| amazon-beauty | 0.0531 / 0.0439 / 0.0451 | base | 0.0533 ± 0.0030 | fuxi-mme 0.0533 | above, within seed noise |" in pub


def test_every_suite_is_in_the_results_page_the_cli_help_and_its_rerun_command():
    from pathlib import Path

    from fuxi_mme.cli import make_parser
    from fuxi_mme.experiments import DOC_ORDER

    assert sorted(DOC_ORDER) == sorted(SUITES)
    experiment = next(a for a in make_parser()._actions if a.dest == "command").choices["experiment"]
    helps = experiment.format_help()
    page = (Path(__file__).parents[1] / "docs" / "results.md").read_text()  # the README links here for the command
    for name in SUITES:
        assert name in helps
    assert "fuxi-mme experiment " + " ".join(DOC_ORDER) + " --root results" in page


# Each suite's job list as planned from the Python tables the YAML files replaced: the number of
# jobs and a hash of the sorted jobs, each one its dataset, variant, seed, CLI arguments, folder,
# reason it cannot run and planned config (data root "D", runs root "R").
PLANS = {
    "ablation": (48, "ce35927c31567cce"),
    "sweep": (60, "c53b6aebc0cb9521"),  # the not-applicable reason names the widths that fit
    "main": (261, "61c163069314cec7"),
    "scaling": (63, "708a8f1e94d57577"),
    "precision": (24, "66bc8c2706a8a6a3"),
    "capacity": (60, "b87afdd5c2b12bc5"),
    "amazon": (63, "21d72b78f90069fe"),
    "width": (117, "813938d98e551468"),
    "norm": (36, "fb8fb5de3ec349c5"),
    "sports": (33, "b7247bd7443bd8bc"),
    "dropout": (90, "2b3afa83a898249b"),
    "temperature": (126, "8c6424cd223ce402"),
    "loss": (18, "89473fcea4ec16ea"),
    "mixer": (36, "fda315ca99895a90"),
    "behavior": (72, "8c98629dd0ccbce3"),
    "robustness": (180, "9625e466cbe0f02c"),
}
# variants added to a suite after its plan was pinned: its earlier jobs must stay as they were
GATE_CONDITIONS = ("clean", "insert 10%", "insert 20%", "insert 40%", "last 20 events", "drop 50%")
ADDED_VARIANTS = {"main": {"ssm"}, "robustness": {f"fuxi-mme gate, {c}" for c in GATE_CONDITIONS}}


# Config fields added after the plans above were pinned: at their defaults they change no job
ADDED_SINCE_PINNED = {
    ("data", "format"): "auto",
    ("data", "header"): None,
    ("model", "mixer"): "attention",
    ("model", "ssm_state"): 16,
    ("model", "ssm_conv"): 4,
    ("model", "ssm_expand"): 2,
    ("model", "ssm_dt_rank"): 0,
    ("model", "ssm_scan"): "auto",
    ("model", "ssm_chunk"): 64,
    ("eval", "beyond"): True,
    ("eval", "final_test"): True,
    ("data", "behavior"): None,
    ("data", "target_behavior"): None,
    ("model", "use_behavior"): False,
    ("data", "noise"): {"kind": "none", "rate": 0.0, "sampling": "uniform", "window": 3, "eval": False},
    ("data", "sparsity"): {"kind": "none", "k": 20, "rate": 0.0},
    ("model", "denoise"): "none",
    ("model", "denoise_weight"): 0.01,
    ("data", "engine"): "auto",
    ("train", "shard_items"): False,
    ("eval", "ranking"): "auto",
}


def _pinned_view(planned):
    if planned is None:
        return None
    planned = json.loads(json.dumps(planned))
    planned.pop("shape", None)  # a label added since: the shape's values are the pinned fields
    for (section, key), default in ADDED_SINCE_PINNED.items():
        if planned[section].get(key, default) == default:
            planned[section].pop(key, None)
    return planned


def _plan_fingerprint(jobs, data_root) -> tuple[int, str]:
    import hashlib

    ids = sorted(
        json.dumps(
            [j.dataset, j.variant, j.seed, [a.replace(str(data_root), "D") for a in j.args], str(j.run_dir), j.invalid, _pinned_view(j.planned)],
            sort_keys=True,
        )
        for j in jobs
    )
    return len(jobs), hashlib.sha256("\n".join(ids).encode()).hexdigest()[:16]


def test_suites_load_from_their_yaml_files_and_plan_the_same_jobs_as_before(tmp_path):
    import tomllib

    from fuxi_mme.experiments.plan import DATA_FOLDERS
    from fuxi_mme.experiments.suites import SUITES_DIR, load_suite

    assert sorted(p.stem for p in SUITES_DIR.glob("*.yaml")) == sorted(SUITES) == sorted(PLANS)
    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["package-data"]["fuxi_mme.experiments"] == ["suites/*.yaml"]  # shipped in the wheel
    for folder in set(DATA_FOLDERS.values()):
        (tmp_path / folder).mkdir()
    for name, expected in PLANS.items():
        suite = load_suite(SUITES_DIR / f"{name}.yaml")
        assert suite.name == name and suite.variants
        jobs = [j for j in plan(suite, Path("R"), tmp_path, []) if j.variant not in ADDED_VARIANTS.get(name, set())]
        assert _plan_fingerprint(jobs, tmp_path) == expected, name


def test_a_suite_file_with_a_mistake_is_refused_naming_it(tmp_path):
    from fuxi_mme.experiments.suites import SuiteError, load_suite

    cases = {
        "typo": ("datasets: [demo]\nvariant: {a: {model: sasrec}}\n", "unknown key variant"),
        "nomodel": ("datasets: [demo]\nvariants: {a: {sets: [model.dim=8]}}\n", "needs a model"),
        "badmodel": ("datasets: [demo]\nvariants: {a: {model: bert}}\n", "model 'bert' is not one of"),
        "badsize": ("datasets: [demo]\nvariants: {a: {model: sasrec, size: huge}}\n", "size 'huge' is not one of base, large"),
        "badseeds": ("datasets: [demo]\nseeds: [a]\nvariants: {a: {model: sasrec}}\n", "seeds must be a list of integers"),
        "badyaml": ("datasets: [demo\n", "is not valid YAML"),
    }
    for name, (text, message) in cases.items():
        (tmp_path / f"{name}.yaml").write_text(text)
        with pytest.raises(SuiteError, match=message) as err:
            load_suite(tmp_path / f"{name}.yaml")
        assert f"{name}.yaml" in str(err.value) and "\n" not in str(err.value)  # one line (a YAML error with where: line, column)
    (tmp_path / "ok.yaml").write_text("datasets: [demo]\nvariants: {x: {model: sasrec, sets: [model.dim=8], protocol: paper}}\n")
    ok = load_suite(tmp_path / "ok.yaml")
    (job,) = plan(ok, tmp_path, None, [], seeds=[0])
    assert (ok.name, job.planned["model"]["dim"], job.planned["data"]["protocol"]) == ("ok", 8, "paper")


def _fake_runs(jobs, seconds: float) -> list[list[dict]]:
    """Finished runs with a per-epoch log (two train epochs of ``seconds`` each) and a runner log."""
    logs = []
    for j in jobs:
        _finish(j.run_dir, j.planned, 0.1 + 0.01 * j.seed)
        recs = [{"kind": "train", "epoch": e, "loss": 5.0 - e, "epoch_seconds": seconds} for e in (1, 2)]
        recs.append({"kind": "valid", "epoch": 2, "NDCG@10": 0.1})
        (j.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
        (j.run_dir.parent / f"{j.run_dir.name}.log").write_text("epoch 1\nepoch 2\n")
        logs.append(recs)
    return logs


def test_packed_logs_keep_the_tables_and_the_curves(tmp_path):
    """A suite's per-epoch logs move into one archive; the tables come out the same without it
    (training seconds kept in train_seconds.json) and the records read back from it unchanged."""
    import tarfile

    from fuxi_mme.experiments.logs import pack_logs, read_records, train_seconds

    suite = SUITES["ablation"]
    jobs = [j for j in plan(suite, tmp_path, None, [], ["demo"], seeds=[0, 1]) if j.variant == "fuxi-alpha"]
    logs = _fake_runs(jobs[:1], 1.5)
    before = aggregate(suite, jobs, tmp_path, [], "c", now="t")
    assert before["results"][0]["train_seconds"] == {"mean": 3.0, "std": 0.0}
    assert pack_logs(tmp_path / "ablation") == 2 and not list(tmp_path.rglob("metrics.jsonl")) and not list(tmp_path.rglob("*.log"))
    assert sorted(p.name for p in (tmp_path / "ablation").iterdir() if p.name != ".runs.lock") == [
        "logs.tar.xz",
        "runs.jsonl",
        "train_seconds.json",
    ]  # no run folders left
    logs += _fake_runs(jobs[1:], 2.5)  # a later run, packed into the same archive
    assert pack_logs(tmp_path / "ablation") == 2
    with tarfile.open(tmp_path / "ablation" / "logs.tar.xz") as tar:
        assert sorted(tar.getnames()) == [
            "demo/fuxi-alpha/seed0.log",
            "demo/fuxi-alpha/seed0/metrics.columns.json",
            "demo/fuxi-alpha/seed1.log",
            "demo/fuxi-alpha/seed1/metrics.columns.json",
        ]
    assert json.loads((tmp_path / "ablation" / "train_seconds.json").read_text()) == {"demo/fuxi-alpha/seed0": 3.0, "demo/fuxi-alpha/seed1": 5.0}
    assert [read_records(j.run_dir) for j in jobs] == logs
    (tmp_path / "ablation" / "logs.tar.xz").unlink()  # the tables never read the archive
    assert [train_seconds(j.run_dir) for j in jobs] == [3.0, 5.0]
    after = aggregate(suite, jobs, tmp_path, [], "c", now="t")
    assert after["results"][0]["train_seconds"] == {"mean": 4.0, "std": pytest.approx(2**0.5)} and after["results"][0]["seeds"] == 2
    assert read_records(jobs[0].run_dir) == [] and train_seconds(tmp_path / "elsewhere" / "run") is None


def test_packing_leaves_the_runs_another_process_still_writes(tmp_path):
    """Two commands on one suite folder (session 7 on the GPU): the first to end packed the logs
    of the other's running jobs, whose later records then replaced the packed ones. A run whose
    folder a training holds, or whose seed<k>.log the runner holds, stays loose until it ends."""
    from fuxi_mme.experiments.logs import pack_logs, read_records, train_seconds
    from fuxi_mme.experiments.store import stored_runs
    from fuxi_mme.utils.locks import held, try_hold_file

    suite = SUITES["ablation"]
    jobs = [j for j in plan(suite, tmp_path, None, [], ["demo"], seeds=[0, 1, 2]) if j.variant == "fuxi-alpha"]
    logs = _fake_runs(jobs, 1.5)
    suite_dir = tmp_path / "ablation"
    with held(jobs[1].run_dir), open(jobs[2].run_dir.parent / "seed2.log", "a") as runner_log:
        assert try_hold_file(runner_log)
        assert pack_logs(suite_dir) == 2  # seed 0's log and metrics.jsonl only
        assert sorted(stored_runs(suite_dir)) == ["demo/fuxi-alpha/seed0"]
        for j in jobs[1:]:
            assert (j.run_dir / "metrics.jsonl").exists() and (j.run_dir / "metrics.json").exists()
            assert (j.run_dir.parent / f"{j.run_dir.name}.log").exists()
    assert pack_logs(suite_dir) == 4
    assert sorted(stored_runs(suite_dir)) == [f"demo/fuxi-alpha/seed{k}" for k in range(3)]
    assert [read_records(j.run_dir) for j in jobs] == logs and [train_seconds(j.run_dir) for j in jobs] == [3.0, 3.0, 3.0]


def test_two_packings_of_one_suite_take_turns(tmp_path):
    """runs.jsonl is read, merged and rewritten under the suite folder's lock: a second packing
    waits for the first instead of writing back a stale read."""
    import threading

    from fuxi_mme.experiments.logs import pack_logs
    from fuxi_mme.utils.locks import held

    jobs = [j for j in plan(SUITES["ablation"], tmp_path, None, [], ["demo"], seeds=[0]) if j.variant == "fuxi-alpha"]
    _fake_runs(jobs, 1.0)
    done = threading.Event()
    with held(tmp_path / "ablation"):
        t = threading.Thread(target=lambda: (pack_logs(tmp_path / "ablation"), done.set()))
        t.start()
        assert not done.wait(0.5) and (jobs[0].run_dir / "metrics.jsonl").exists()  # waiting, nothing moved
    t.join(30)
    assert done.is_set() and not (jobs[0].run_dir / "metrics.jsonl").exists()


def test_a_job_another_process_trains_is_left_to_it(tmp_path, monkeypatch):
    """Two commands with the same unfinished job: the second neither deletes the live folder nor
    empties the live log; it reports the job as someone else's. A packing in progress holds the
    suite folder, and a job's folder is prepared only once it is done."""
    import threading

    from fuxi_mme.experiments import runner
    from fuxi_mme.utils.locks import held, try_hold_file

    monkeypatch.setattr(runner, "LOG_WAIT_S", 0.3)
    monkeypatch.setattr(runner, "launch", lambda job, log, env: subprocess.Popen([sys.executable, "-c", "print('trained')"], stdout=log))
    jobs = [j for j in plan(SUITES["ablation"], tmp_path, None, [], ["demo"], seeds=[0, 1, 2]) if j.variant == "fuxi-alpha"]
    for j in jobs:
        j.run_dir.mkdir(parents=True)
        (j.run_dir / "metrics.jsonl").write_text('{"kind": "train", "epoch": 1}\n')
        (j.run_dir.parent / f"{j.run_dir.name}.log").write_text("epoch 1\n")
    log1 = open(jobs[1].run_dir.parent / "seed1.log", "a")
    with held(jobs[0].run_dir), log1:  # seed 0: its training holds the folder; seed 1: its runner holds the log
        assert try_hold_file(log1)
        for j in jobs[:2]:
            assert runner.run_job(j, {})[1] == runner.BUSY
            assert (j.run_dir / "metrics.jsonl").exists() and (j.run_dir.parent / f"{j.run_dir.name}.log").read_text() == "epoch 1\n"
    done = threading.Event()
    with held(tmp_path / "ablation"):  # a packing in progress
        t = threading.Thread(target=lambda: (runner.run_job(jobs[2], {}), done.set()))
        t.start()
        assert not done.wait(0.5) and (jobs[2].run_dir / "metrics.jsonl").exists()  # waits; the folder untouched
    t.join(30)
    assert done.is_set() and not jobs[2].run_dir.exists()  # then starts afresh: the old folder gone
    assert (jobs[2].run_dir.parent / "seed2.log").read_text() == "trained\n"  # its log restarted, not appended to


def test_a_claim_outlasts_a_probe():
    """in_use() takes a shared lock for an instant; a training claiming its folder then retries
    instead of failing (the review measured 7% failures in a tight probe loop without it)."""
    import os
    import tempfile
    import threading

    from fuxi_mme.utils import locks

    d = tempfile.mkdtemp()
    fd = os.open(d, os.O_RDONLY)
    locks.fcntl.flock(fd, locks.fcntl.LOCK_SH)  # a probe that lasts 0.3 s
    threading.Timer(0.3, os.close, [fd]).start()
    with locks.held(d, retry_s=5.0):
        assert locks.in_use(d)  # the claim went through once the probe let go
    with pytest.raises(locks.InUseError, match="in use by another"):
        fd2 = os.open(d, os.O_RDONLY)
        locks.fcntl.flock(fd2, locks.fcntl.LOCK_SH)
        try:
            with locks.held(d, retry_s=0.2):
                pass
        finally:
            os.close(fd2)


def _source_run(root, suite: str, variant: str, seed: int, full: bool = True, sets: dict | None = None, seconds: float = 2.0):
    """A finished run of ``suite`` on ml-100k as it plans it (``sets``: config fields changed after
    planning), with a two-epoch log; ``full``: its test record has beyond and buckets."""
    (job,) = [j for j in plan(SUITES[suite], root, None, [], ["ml-100k"], seeds=[seed], check_data=False) if j.variant == variant]
    cfg = json.loads(json.dumps(job.planned))
    for key, value in (sets or {}).items():
        section, field = key.split(".", 1)
        cfg[section][field] = value
    _finish(job.run_dir, cfg, 0.1 + seed / 100)
    m = json.loads((job.run_dir / "metrics.json").read_text())
    if full:
        m["test"].update(beyond={"Coverage@10": 0.5}, buckets={"short": {"users": 1, "NDCG@10": 0.1}})
    (job.run_dir / "metrics.json").write_text(json.dumps(m))
    (job.run_dir / "run.json").write_text(json.dumps({"commit": "abc", "dataset": {"has_timestamps": True}}))
    recs = [{"kind": "train", "epoch": e, "epoch_seconds": seconds / 2} for e in (1, 2)]
    (job.run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    return job.run_dir


def test_a_run_another_suite_already_trained_is_reused_not_trained_again(tmp_path, monkeypatch, capsys):
    """The robustness suite's clean rows train exactly what the main suite's runs trained: the
    runner copies such a run's results in (saying so) instead of training it again. The copy
    stands on its own (its log and training seconds stay when the source is rerun or gone).
    Not reused: a run without the metrics the tables read, another model (popularity skips the
    model settings), a setting only a prefix away from an ignored one (attention_norm), another
    kernel path, a job another process holds, or anything with --no-reuse."""
    from fuxi_mme.experiments import runner
    from fuxi_mme.experiments.logs import read_records, train_seconds
    from fuxi_mme.experiments.store import run_file
    from fuxi_mme.utils.locks import try_hold_file

    src0 = _source_run(tmp_path, "main", "fuxi-alpha", 0, seconds=3.0)
    _source_run(tmp_path, "main", "fuxi-alpha", 1, full=False)
    _source_run(tmp_path, "mixer", "fuxi-alpha", 2, sets={"model.attention_norm": 0.5})
    _source_run(tmp_path, "mixer", "fuxi-alpha", 3, sets={"model.attention": "reference"})
    _source_run(tmp_path, "main", "fuxi-alpha", 4)
    _source_run(tmp_path, "main", "fuxi-alpha", 5)
    older_copy = _source_run(tmp_path, "mixer", "fuxi-alpha", 6)  # an older copy: its metrics.json names its source
    m = json.loads((older_copy / "metrics.json").read_text())
    (older_copy / "metrics.json").write_text(json.dumps({**m, "run_dir": "elsewhere/main/ml-100k/fuxi-alpha/seed6"}))
    pending: list = []
    monkeypatch.setattr(runner, "run_jobs", lambda jobs, *a, **k: pending.extend(jobs) or {})
    clean = tmp_path / "robustness" / "ml-100k" / "fuxi-alpha,_clean"
    (clean).mkdir(parents=True)
    with open(clean / "seed5.log", "a") as held_log:  # another runner holds seed 5's log
        assert try_hold_file(held_log)
        runner.run_suites([SUITES["robustness"]], tmp_path, None, datasets=["ml-100k"], seeds=[0, 1, 2, 3, 4, 5, 6], variants=["fuxi-alpha, clean"])
    assert sorted(j.seed for j in pending) == [1, 2, 3, 5, 6]
    out = capsys.readouterr().out
    assert "the same training as main/ml-100k/fuxi-alpha/seed0, reused" in out and "seed4, reused" in out
    reused = clean / "seed0"
    assert run_file(reused, "run.json")["reused_from"] == "main/ml-100k/fuxi-alpha/seed0"
    assert run_file(reused, "metrics.json") == {**run_file(src0, "metrics.json"), "run_dir": str(reused)}
    shutil.rmtree(tmp_path / "main")  # the source rerun or gone: the copy keeps what it took
    assert train_seconds(reused) == 3.0 and len(read_records(reused)) == 2
    pending.clear()
    _source_run(tmp_path, "mixer", "fuxi-alpha", 0)  # a neural run is no popularity run
    runner.run_suites([SUITES["main"]], tmp_path, None, datasets=["ml-100k"], seeds=[0], variants=["popularity"])
    assert [j.variant for j in pending] == ["popularity"]
    pending.clear()
    shutil.rmtree(tmp_path / "robustness")
    runner.run_suites([SUITES["robustness"]], tmp_path, None, datasets=["ml-100k"], seeds=[0], variants=["fuxi-alpha, clean"], reuse=False)
    assert [j.seed for j in pending] == [0]  # the mixer run would do; --no-reuse trains it


def test_a_rerun_for_the_beyond_metrics_takes_an_identical_run_that_has_them(tmp_path, monkeypatch):
    """--rerun without-beyond wants the metrics, not new training: a run of the same training in
    another suite that has them replaces the old run (kept as seed<k>.stale); --rerun all trains."""
    from fuxi_mme.experiments import runner
    from fuxi_mme.experiments.logs import read_records, train_seconds
    from fuxi_mme.experiments.store import run_file

    old = _source_run(tmp_path, "main", "fuxi-alpha", 0, full=False)
    src = _source_run(tmp_path, "mixer", "fuxi-alpha", 0, seconds=5.0)
    (src / "metrics.jsonl").unlink()  # its log elsewhere (another branch): its seconds in its suite's index
    (tmp_path / "mixer" / "train_seconds.json").write_text(json.dumps({"ml-100k/fuxi-alpha/seed0": 5.0}))
    pending: list = []
    monkeypatch.setattr(runner, "run_jobs", lambda jobs, *a, **k: pending.extend(jobs) or {})
    runner.run_suites([SUITES["main"]], tmp_path, None, datasets=["ml-100k"], seeds=[0], variants=["fuxi-alpha"], rerun="all")
    assert [j.seed for j in pending] == [0] and "beyond" not in run_file(old, "metrics.json")["test"]
    pending.clear()
    runner.run_suites([SUITES["main"]], tmp_path, None, datasets=["ml-100k"], seeds=[0], variants=["fuxi-alpha"], rerun="without-beyond")
    assert pending == [] and "beyond" in run_file(old, "metrics.json")["test"]
    assert run_file(old, "run.json")["reused_from"] == "mixer/ml-100k/fuxi-alpha/seed0"
    assert "beyond" not in run_file(old.with_name("seed0.stale"), "metrics.json")["test"]  # the old run kept aside
    assert train_seconds(old) == 5.0  # the source's, not the 2.0 s the replaced run left in the index
    assert read_records(old) == []  # the source's log was elsewhere: none, not the replaced run's archived one


def test_a_run_set_aside_no_longer_answers_for_its_folder(tmp_path):
    """A packed run moved aside for a new one takes its runs.jsonl entry with it: until the new
    run ends, its folder holds no finished run (a new config.json beside the old metrics.json
    would otherwise count as finished, with the old settings' results)."""
    from fuxi_mme.experiments.logs import pack_logs
    from fuxi_mme.experiments.store import run_file, set_aside

    run = _source_run(tmp_path, "main", "fuxi-alpha", 0)
    pack_logs(tmp_path / "main")
    assert not run.exists() and run_file(run, "metrics.json") is not None  # packed
    aside = set_aside(run)
    assert run_file(run, "metrics.json") is None and run_file(aside, "metrics.json")["test"]["NDCG@10"] == 0.1
    run.mkdir(parents=True)
    (run / "config.json").write_text("{}")  # the new run started, then died
    assert run_file(run, "metrics.json") is None
    set_aside(run)  # a second rerun: the newer stale replaces the older
    assert run_file(aside, "metrics.json") is None and run_file(aside, "config.json") == {}


def test_a_copied_run_shows_its_own_training_seconds_not_those_of_its_sources_rerun(tmp_path):
    """Older copies name their source's folder in metrics.json. The tables take a copy's own
    seconds; the source's only while the source is still the same run (the same metrics.json),
    never those of a run that has since replaced it."""
    from fuxi_mme.experiments.aggregate import _seconds

    src = _source_run(tmp_path, "main", "fuxi-alpha", 0, seconds=2.0)
    copy = tmp_path / "mixer" / "ml-100k" / "fuxi-alpha" / "seed0"
    shutil.copytree(src, copy)
    (copy / "metrics.jsonl").unlink()  # a copy keeps no log of its own
    assert _seconds(copy) == 2.0  # the source's: still the same run
    (tmp_path / "mixer" / "train_seconds.json").write_text(json.dumps({"ml-100k/fuxi-alpha/seed0": 7.0}))
    assert _seconds(copy) == 7.0  # its own, once known
    (tmp_path / "mixer" / "train_seconds.json").unlink()
    m = json.loads((src / "metrics.json").read_text())
    (src / "metrics.json").write_text(json.dumps({**m, "test": {**m["test"], "NDCG@10": 0.5}}))  # the source rerun
    assert _seconds(copy) is None


def test_a_log_that_lost_its_first_epochs_gives_no_training_seconds():
    from fuxi_mme.experiments.logs import sum_train_seconds

    whole = [{"kind": "train", "epoch": e, "epoch_seconds": 2.0} for e in (1, 2, 3)]
    assert sum_train_seconds(whole) == 6.0 and sum_train_seconds([]) == 0.0
    assert sum_train_seconds(whole[1:]) is None  # a table would otherwise show a third of the time


def test_packed_logs_come_back_byte_for_byte(tmp_path):
    """The columns encoding gives a log back byte for byte (float32 values, integer ratios such
    as HR@K = hits / users, GiB = bytes / 2**30, lists); a log it cannot give back stays plain;
    a run copied from another suite stores no log and reads its source's; packing rewrites the
    runs' JSON files on one line with the same values."""
    import tarfile

    import numpy as np

    from fuxi_mme.experiments.logs import decode_columns, encode_columns, log_text, pack_logs, read_records

    recs = []
    for e in range(1, 6):
        recs.append(
            {
                "kind": "train",
                "epoch": e,
                "step": 175 * e,
                "loss": float(np.float32(10 / e)),
                "lr": 0.001,
                "seq_per_s": 22363 / (1.3 + e / 7),
                "epoch_seconds": 1.3 + e / 7,
                "load": [float(np.float32(1 / 3)), 0.1 * e],
                "gpu_mem_gb": (1234567 * e) / 2**30,
                "ok": True,
                "note": None,
            }
        )
        recs.append({"kind": "valid", "epoch": e, "HR@10": (100 + e) / 22363, "NDCG@10": 0.1 / e, "users": 22363})
    text = "".join(json.dumps(r) + "\n" for r in recs) + json.dumps({"kind": "test", "MRR": float("nan")}) + "\n"
    doc = encode_columns(text)
    assert doc is not None and decode_columns(json.loads(json.dumps(doc))) == text
    assert len(json.dumps(doc, separators=(",", ":"))) < len(text)
    assert encode_columns('{"a":1}\n') is None and encode_columns('{"a": 1}') is None  # not as written by json.dumps

    for suite, variant in (("main", "a"), ("copy", "b")):
        run = tmp_path / suite / "demo" / variant / "seed0"
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(text)
        (run / "config.json").write_text(json.dumps({"x": [1, 2]}, indent=2) + "\n")
        (run / "metrics.json").write_text(json.dumps({"run_dir": "results/main/demo/a/seed0", "test": {"HR@10": 0.5}}, indent=2))
    plain = tmp_path / "main" / "demo" / "c" / "seed0"
    plain.mkdir(parents=True)
    (plain / "metrics.jsonl").write_text('{"kind":"train"}\n')
    assert pack_logs(tmp_path / "main") == 2 and pack_logs(tmp_path / "copy") == 1
    with tarfile.open(tmp_path / "main" / "logs.tar.xz") as tar:
        assert sorted(tar.getnames()) == ["demo/a/seed0/metrics.columns.json", "demo/c/seed0/metrics.jsonl"]
    with tarfile.open(tmp_path / "copy" / "logs.tar.xz") as tar:
        assert tar.getnames() == []  # the copy's log is its source's
    copy = tmp_path / "copy" / "demo" / "b" / "seed0"
    assert log_text(copy) == log_text(tmp_path / "main" / "demo" / "a" / "seed0") == text
    assert log_text(plain) == '{"kind":"train"}\n' and len(read_records(copy)) == len(recs) + 1
    from fuxi_mme.experiments.store import RUNS, run_file

    assert not copy.exists() and run_file(copy, "config.json") == {"x": [1, 2]}  # stored in the suite's runs.jsonl
    assert run_file(copy, "metrics.json")["test"] == {"HR@10": 0.5}
    assert (tmp_path / "copy" / RUNS).read_text().splitlines()[0].startswith('{"run":"demo/b/seed0","config.json":{"x":[1,2]}')
    source = tmp_path / "main" / "demo" / "a" / "seed0"
    source.mkdir(parents=True)
    (source / "metrics.json").write_text('{"run_dir": "elsewhere"}')  # a loose file wins over the stored copy
    assert log_text(copy) is None  # the source has been run again since: not its log any more


def test_committed_results_aggregate_byte_for_byte_without_their_logs(tmp_path, monkeypatch):
    """results/loss.json and .md come back byte for byte from the committed runs.jsonl alone
    (no per-epoch logs), with the commit and time they were stamped with."""
    import shutil

    repo = Path(__file__).parents[1] / "results"
    if not (repo / "loss.json").exists():
        pytest.skip("no committed results in this checkout")
    shutil.copytree(repo / "loss", tmp_path / "results" / "loss", ignore=shutil.ignore_patterns("logs.tar.xz", "metrics.jsonl", "*.log"))
    monkeypatch.chdir(tmp_path)  # the runs' metrics.json name their folders relative to the repository
    old = json.loads((repo / "loss.json").read_text())
    jobs = plan(SUITES["loss"], Path("results"), None, [], check_data=False)
    aggregate(SUITES["loss"], jobs, Path("results"), old["failed"], old["commit"], now=old["time"])
    for f in ("loss.json", "loss.md"):
        assert (tmp_path / "results" / f).read_bytes() == (repo / f).read_bytes(), f
    assert all("train_seconds" in e for e in old["results"])


def test_aggregate_only_packs_the_logs_when_asked(tmp_path, capsys):
    from fuxi_mme.cli import main

    jobs = [j for j in plan(SUITES["ablation"], tmp_path, None, [], ["demo"], seeds=[0]) if j.variant == "fuxi-alpha"]
    _fake_runs(jobs, 2.0)
    args = ["experiment", "ablation", "--root", str(tmp_path), "--datasets", "demo", "--seeds", "0", "--aggregate-only"]
    assert main(args) == 0 and (jobs[0].run_dir / "metrics.jsonl").exists()  # aggregating alone moves nothing
    assert main([*args, "--pack-logs"]) == 0
    assert "packed 2 per-epoch log files into logs.tar.xz" in capsys.readouterr().out
    assert not (jobs[0].run_dir / "metrics.jsonl").exists() and (tmp_path / "ablation" / "logs.tar.xz").is_file()
    row = next(e for e in json.loads((tmp_path / "ablation.json").read_text())["results"] if e["variant"] == "fuxi-alpha")
    assert row["train_seconds"]["mean"] == 4.0


def test_aggregate_only_also_tabulates_runs_on_datasets_given_by_hand(tmp_path, capsys):
    """A suite run earlier with --datasets on a dataset outside its list: aggregating without
    --datasets shows those runs too, and lists as missing only the seeds of variants started
    there, loose or packed into runs.jsonl."""
    from fuxi_mme.cli import main
    from fuxi_mme.experiments.plan import aggregation_jobs
    from fuxi_mme.experiments.store import pack_runs

    suite = SUITES["ablation"]  # demo, ml-100k, amazon-beauty, ml-1m-ts70
    extra = plan(suite, tmp_path, None, [], ["amazon-toys"], seeds=[0, 1, 2])
    _fake_runs([j for j in extra if j.variant == "fuxi-alpha" and j.seed < 2], 2.0)
    jobs = aggregation_jobs(suite, tmp_path, None, [])
    toys = [(j.variant, j.seed) for j in jobs if j.dataset == "amazon-toys"]
    assert toys == [("fuxi-alpha", 0), ("fuxi-alpha", 1), ("fuxi-alpha", 2)]
    assert len(jobs) == len(plan(suite, tmp_path, None, [], check_data=False)) + 3
    assert [j.dataset for j in aggregation_jobs(suite, tmp_path, None, [], ["demo"])] == ["demo"] * 12  # --datasets: those only
    stale = [j for j in extra if j.variant == "fuxi-mme (full)" and j.seed == 0]  # only a run moved aside: not started
    _fake_runs(stale, 2.0)
    stale[0].run_dir.rename(stale[0].run_dir.with_name("seed0.stale"))
    (tmp_path / "ablation" / "amazon-toys" / "notes").mkdir()  # a stray folder
    assert [(j.variant, j.seed) for j in aggregation_jobs(suite, tmp_path, None, []) if j.dataset == "amazon-toys"] == toys
    pack_runs(tmp_path / "ablation")  # the committed layout: run files in runs.jsonl, no folders
    assert [(j.variant, j.seed) for j in aggregation_jobs(suite, tmp_path, None, []) if j.dataset == "amazon-toys"] == toys
    assert main(["experiment", "ablation", "--root", str(tmp_path), "--aggregate-only"]) == 0
    res = json.loads((tmp_path / "ablation.json").read_text())
    (row,) = [e for e in res["results"] if e["dataset"] == "amazon-toys"]
    assert row["variant"] == "fuxi-alpha" and row["seeds"] == 2
    assert {(m["dataset"], m["variant"], m["runs"]) for m in res["missing"] if m["dataset"] == "amazon-toys"} == {("amazon-toys", "fuxi-alpha", 1)}


def test_a_command_on_a_subset_keeps_the_other_finished_rows_in_the_tables(tmp_path, monkeypatch):
    """Running one variant (--variants) rewrites the suite's table with every finished run, not
    only that variant's; the missing list stays the command's own selection."""
    from fuxi_mme.experiments import runner

    suite = SUITES["ablation"]
    done = [j for j in plan(suite, tmp_path, None, [], ["demo"]) if j.variant == "fuxi-alpha"]
    _fake_runs(done, 1.0)

    def fake_run(job, env, stopping=None):
        _fake_runs([job], 1.0)
        return job, 0, 1.0

    monkeypatch.setattr(runner, "run_job", fake_run)
    (res,) = runner.run_suites([suite], tmp_path, None, datasets=["demo"], variants=["fuxi-mme (full)"])
    assert sorted(e["variant"] for e in res["results"]) == ["fuxi-alpha", "fuxi-mme (full)"]
    assert res["missing"] == []  # the selection ran in full; other variants' gaps are --aggregate-only's to list


def test_cross_domain_ranks_each_model_per_dataset_and_averages_the_ranks():
    from fuxi_mme.experiments.tables import cross_domain

    def row(d, v, x):
        return {"dataset": d, "variant": v, "test/NDCG@10": {"mean": x, "std": 0.0}}

    res = {"results": [row("a", "sasrec", 0.3), row("a", "fuxi-mme", 0.2), row("b", "sasrec", 0.1), row("b", "fuxi-mme", 0.4), row("b", "hstu", 0.2)]}
    lines = cross_domain(res).splitlines()
    assert lines[0] == "| model | a | b | mean rank |"
    assert "| sasrec | 1 (0.3000) | 3 (0.1000) | 2.0 |" in lines and "| fuxi-mme | 2 (0.2000) | 1 (0.4000) | 1.5 |" in lines
    assert "| hstu | - | 2 (0.2000) | 2.0 |" in lines and not any(x.startswith("| popularity") for x in lines)
    assert cross_domain({"results": [row("a", "sasrec large", 0.5)]}, " large").splitlines()[2] == "| sasrec large | 1 (0.5000) | 1.0 |"


def test_an_interrupted_suite_stops_its_runs_and_starts_no_more(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM) during a suite: the running run's whole process group is stopped,
    queued runs never start, and the interrupt reaches the caller (the same command resumes)."""
    import os
    import signal
    import sys
    import threading
    import time

    from fuxi_mme.experiments import runner
    from fuxi_mme.experiments.plan import Job

    pids = tmp_path / "pids"
    pids.mkdir()
    # each "run" records its pid and its child's, then sleeps: a stand-in for a training process
    # and a compile worker it started
    script = "import os, subprocess, sys, time; c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
    script += f"open(os.path.join({str(pids)!r}, str(os.getpid())), 'w').write(str(c.pid)); time.sleep(60)"
    monkeypatch.setattr(runner, "command", lambda job: [sys.executable, "-c", script])
    monkeypatch.setattr(runner, "visible_gpus", lambda: [])
    jobs = [Job("demo", "sasrec", s, [], tmp_path / "demo" / "sasrec" / f"seed{s}") for s in range(4)]

    def interrupt_when_started():
        while len(list(pids.iterdir())) < 2:
            time.sleep(0.05)
        time.sleep(0.3)
        os.kill(os.getpid(), signal.SIGTERM)  # what `kill` sends; read as Ctrl-C while the suite runs

    threading.Thread(target=interrupt_when_started, daemon=True).start()
    t0 = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        runner.run_jobs(jobs, 2, {id(j): "s" for j in jobs})
    assert time.monotonic() - t0 < 30
    started = list(pids.iterdir())
    assert len(started) == 2  # two at a time: the other two never started, and left no log
    assert sorted(p.name for p in (tmp_path / "demo" / "sasrec").glob("*.log")) == sorted(f"seed{j.seed}.log" for j in jobs[:2])
    time.sleep(0.2)
    for f in started:
        for pid in (int(f.name), int(f.read_text())):
            stat = Path(f"/proc/{pid}/stat")
            # the runs and their children are gone, or zombies until their parent (or init) reaps them
            assert not stat.exists() or stat.read_text().rsplit(")", 1)[1].split()[0] == "Z"


def test_the_time_budget_starts_no_run_after_it_and_lets_running_ones_finish(tmp_path, monkeypatch, capsys):
    import time as _time

    from fuxi_mme.experiments import runner
    from fuxi_mme.experiments.plan import Job

    monkeypatch.setattr(runner, "visible_gpus", lambda: [])
    ran = []

    def fake_run(job, env, stopping=None):
        _time.sleep(1.5)  # longer than the budget: the next two would start after it
        ran.append(job.seed)
        return job, 0, 1.5

    monkeypatch.setattr(runner, "run_job", fake_run)
    jobs = [Job("demo", "sasrec", s, [], tmp_path / "demo" / "sasrec" / f"seed{s}") for s in range(6)]
    failed = runner.run_jobs(jobs, 2, {id(j): "s" for j in jobs}, deadline=_time.monotonic() + 0.5)
    assert failed == {}  # unstarted runs are not failures
    assert sorted(ran) == [0, 1]  # the first two started before the deadline and finished; no more started
    assert "time budget spent: 4 run(s) not started; the same command runs them" in capsys.readouterr().out


def test_a_run_whose_wait_for_the_gpu_outlasts_the_budget_does_not_start(tmp_path, monkeypatch, capsys):
    """The budget is checked again after the wait for memory or cores; and a run that ran out of
    GPU memory and meets the budget before its retry is reported as failed, not as unstarted."""
    import time as _time

    from fuxi_mme.experiments import runner
    from fuxi_mme.experiments.packing import PackingGate
    from fuxi_mme.experiments.plan import Job

    monkeypatch.setattr(runner, "visible_gpus", lambda: ["0"])
    ran = []

    def fake_run(job, env, stopping=None):
        ran.append(job.seed)
        job.run_dir.mkdir(parents=True, exist_ok=True)
        (job.run_dir.parent / f"{job.run_dir.name}.log").write_text("fuxi-mme: error: CUDA out of memory.\n")
        _time.sleep(0.6)  # past the deadline: its retry must not start
        return job, 2, 0.6

    class SlowGate(PackingGate):
        def acquire(self, gpu, key):
            if self.running.get(gpu, 0):  # the second job waits for memory until after the deadline
                _time.sleep(1.0)
            super().acquire(gpu, key)

    monkeypatch.setattr(runner, "run_job", fake_run)
    jobs = [Job("demo", "sasrec", s, [], tmp_path / "demo" / "sasrec" / f"seed{s}") for s in range(2)]
    gate = SlowGate(free=lambda g: 100.0, settle_s=0, idle=lambda: None)
    failed = runner.run_jobs(jobs, 2, {id(j): "s" for j in jobs}, gate=gate, deadline=_time.monotonic() + 0.5)
    out = capsys.readouterr().out
    assert ran == [0]  # seed 1 waited past the budget: never started; seed 0 ran once, no retry after it
    assert failed == {"s": [str(jobs[0].run_dir)]} and "seed 0: FAILED (exit 2" in out
    assert "time budget spent: 1 run(s) not started" in out and gate.running["0"] == 0


def test_experiment_rejects_a_non_positive_time_budget(capsys):
    from fuxi_mme.cli import main

    assert main(["experiment", "ablation", "--time-budget", "0", "--root", "/nonexistent-root"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["fuxi-mme: error: --time-budget must be positive seconds, got 0.0"]


def test_an_unknown_variant_is_refused_naming_the_known_ones(tmp_path, capsys):
    from fuxi_mme.cli import main

    assert main(["experiment", "ablation", "--datasets", "demo", "--variants", "bogus", "--root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown variant 'bogus' of ablation; known:" in err and "fuxi-alpha" in err and "\n" not in err.strip()
    assert not any(tmp_path.iterdir())  # nothing run, nothing written

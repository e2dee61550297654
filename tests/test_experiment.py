import json

import pytest

from fuxi_mme.experiment import SUITES, aggregate, plan


def test_plan_builds_cli_runs_with_the_variant_overrides(tmp_path):
    jobs = plan(SUITES["ablation"], tmp_path, tmp_path / "data", ["train.epochs=3"], ["demo", "ml-100k"])
    assert len(jobs) == 2 * 4 * 3
    moe_only = next(j for j in jobs if j.dataset == "ml-100k" and j.variant == "+moe" and j.seed == 1)
    a = moe_only.args
    assert a[a.index("--preset") + 1] == "ml-100k-fuxi-mme-base" and a[a.index("--seed") + 1] == "1"
    sets = [a[i + 1] for i, x in enumerate(a) if x == "--set"]
    assert "model.num_embeddings=1" in sets and "model.qk_dim=50" in sets and sets[-1] == "train.epochs=3"
    assert a[a.index("--data-path") + 1] == str(tmp_path / "data" / "ml-100k")
    with pytest.raises(ValueError, match="needs --data-root"):
        plan(SUITES["ablation"], tmp_path, None, [], ["ml-100k"])


def test_aggregate_means_and_stds_over_seeds(tmp_path):
    suite = SUITES["ablation"]
    jobs = plan(suite, tmp_path, None, [], ["demo"])
    for j, v in zip([j for j in jobs if j.variant == "fuxi-alpha"], (0.1, 0.2, 0.3)):
        j.run_dir.mkdir(parents=True)
        m = {"NDCG@10": v, "HR@10": 2 * v, "NDCG@50": v, "HR@50": v, "MRR": v}
        (j.run_dir / "metrics.json").write_text(json.dumps({"protocol": "loo-val", "test": m, "valid_best": m, "selected_epoch": 3, "run_dir": str(j.run_dir)}))
    res = aggregate(suite, jobs, tmp_path, [])
    (row,) = res["results"]
    assert row["seeds"] == 3 and row["test/NDCG@10"]["mean"] == pytest.approx(0.2)
    assert row["test/NDCG@10"]["std"] == pytest.approx(0.1)
    assert "| demo | fuxi-alpha | 3 | 0.2000 ± 0.1000" in (tmp_path / "ablation.md").read_text()

"""The results page's tuning section, from study folders under results/tune."""

import json
from pathlib import Path

from fuxi_mme.experiments.page import write_docs
from fuxi_mme.experiments.tuning import load_studies, tuning_section


def _study(root: Path, model: str, base: float, best: float, test: float, gpu: str = "NVIDIA H200") -> None:
    d = root / "tune" / f"beauty-{model}"
    d.mkdir(parents=True)
    trials = [
        {"number": 0, "params": {"train.lr": 0.001}, "state": "complete", "value": base, "seconds": 10.0},
        {"number": 1, "params": {"train.lr": 0.002}, "state": "complete", "value": best, "seconds": 12.0},
        {"number": 2, "params": {"train.lr": 0.0002}, "state": "pruned", "value": 0.01, "seconds": 3.0},
    ]
    res = {
        "model": model,
        "dataset": "amazon-beauty",
        "trials": trials,
        "best": trials[1],
        "baseline": trials[0],
        "wall_seconds": 20.0,
        "test": {"trial": 1, "NDCG@10": test, "HR@10": 2 * test},
    }
    (d / "results.json").write_text(json.dumps(res))
    (d / "trials.jsonl").write_text("\n".join(json.dumps(t) for t in trials) + "\n")
    (d / "best-run.json").write_text(json.dumps({"device": {"device": "cuda", "gpu": gpu}}))


def _main() -> dict:
    def entry(variant: str, valid: float, test: float) -> dict:
        return {
            "dataset": "amazon-beauty",
            "variant": variant,
            "protocol": "loo-val",
            "seeds": 3,
            "valid_best/NDCG@10": {"mean": valid, "std": 0.001},
            "test/NDCG@10": {"mean": test, "std": 0.002},
        }

    return {"suite": "main", "results": [entry("sasrec", 0.07, 0.05), entry("sasrec large", 0.08, 0.06)]}


def test_section_sets_each_study_beside_the_main_suite_rows(tmp_path):
    _study(tmp_path, "sasrec", 0.06, 0.075, 0.058)
    _study(tmp_path, "fuxi-mme", 0.065, 0.078, 0.061)
    assert [s["model"] for s in load_studies(tmp_path / "tune")] == ["fuxi-mme", "sasrec"]
    text = "\n".join(tuning_section(tmp_path, _main()))
    rows = [line for line in text.splitlines() if line.startswith("| amazon-beauty")]
    assert rows[1].split(" | ")[1:6] == ["sasrec", "3 (2 / 1)", "20", "25", "NVIDIA H200"]
    assert "0.0600 | 0.0750 (trial 1) | 0.0580 / 0.1160 | 0.0700 / 0.0500 ± 0.0020 (3) | 0.0800 / 0.0600 ± 0.0020 (3) |" in rows[1]
    assert rows[0].endswith("| - | - |")  # no main-suite row for fuxi-mme here
    assert "+0.0150 valid NDCG@10 against its preset's trial 0" in text
    ranked = "fuxi-mme 0.0610 (valid 0.0780, 3 trials), sasrec 0.0580 (valid 0.0750, 3 trials)"
    assert f"Same budget on amazon-beauty, winners' test NDCG@10, best first: {ranked}" in text


def test_page_has_the_section_only_with_studies_main_suite_or_not(tmp_path):
    page = write_docs(tmp_path, tmp_path / "docs" / "results.md").read_text()
    assert "fuxi-mme tune" not in page
    _study(tmp_path, "sasrec", 0.06, 0.075, 0.058)
    page = write_docs(tmp_path, tmp_path / "docs" / "results.md").read_text()
    assert "### Tuning" in page


def test_an_unfinished_study_is_listed_without_values(tmp_path):
    """An interrupted study (trial 0 still running, no winner yet) does not stop the page."""
    d = tmp_path / "tune" / "beauty-sasrec"
    d.mkdir(parents=True)
    running = {"number": 0, "params": {"train.lr": 0.001}, "state": "running", "value": None, "seconds": None}
    (d / "results.json").write_text(
        json.dumps({"model": "sasrec", "dataset": "amazon-beauty", "trials": [running], "best": None, "baseline": running})
    )
    text = "\n".join(tuning_section(tmp_path, None))
    assert "| amazon-beauty | sasrec | 1 (0 / 0) | 0 | 0 | - | - | - | not tested | - | - |" in text

"""Seeds far below their siblings (a run that stopped learning early) are flagged, never
dropped: the row's mean keeps them, the tables mark the row and say which seed it was."""

from fuxi_mme.experiments.aggregate import _row, low_seeds
from fuxi_mme.experiments.page import main_sections
from fuxi_mme.experiments.robustness import degradation_table, robustness_section
from fuxi_mme.experiments.tables import cross_domain, headline, markdown


def _metrics(valid: float | None, test: float, seed: int) -> dict:
    m = {"run_dir": f"results/main/ml-1m-ts70/sasrec/seed{seed}", "protocol": "loo-val", "test": {"NDCG@10": test}}
    if valid is not None:
        m["valid_best"] = {"NDCG@10": valid}
    return m


def test_a_seed_under_half_the_median_is_flagged_and_kept_in_the_mean():
    runs = [_metrics(0.127, 0.133, 0), _metrics(0.0249, 0.0247, 1), _metrics(0.126, 0.1325, 2)]
    (low,) = low_seeds(runs)
    assert low == {"seed": "seed1", "valid NDCG@10": 0.0249, "median": 0.126}
    row = _row("ml-1m-ts70", "sasrec", runs, [])
    assert row["low_seeds"] == [low] and row["seeds"] == 3
    assert abs(row["test/NDCG@10"]["mean"] - (0.133 + 0.0247 + 0.1325) / 3) < 1e-12  # still in the mean


def test_ordinary_spread_two_seeds_or_a_missing_value_flag_nothing():
    assert low_seeds([_metrics(0.10, 0.1, 0), _metrics(0.064, 0.06, 1), _metrics(0.12, 0.1, 2)]) == []  # 0.064 > half of 0.10
    assert low_seeds([_metrics(0.10, 0.1, 0), _metrics(0.01, 0.01, 1)]) == []  # two seeds: no median to trust
    assert low_seeds([_metrics(0.12, 0.1, 0), _metrics(None, 0.01, 1), _metrics(0.12, 0.1, 2)]) == []
    assert "low_seeds" not in _row("d", "v", [_metrics(0.1, 0.1, s) for s in range(3)], [])


def _res(variant: str = "sasrec") -> dict:
    runs = [_metrics(0.127, 0.133, 0), _metrics(0.0249, 0.0247, 1), _metrics(0.126, 0.1325, 2)]
    good = [_metrics(0.17, 0.18, s) for s in range(3)]
    rows = [_row("ml-1m-ts70", variant, runs, []), _row("ml-1m-ts70", "fuxi-alpha", good, [])]
    return {"suite": "main", "description": "d", "commit": "c", "time": "t", "results": rows, "failed": [], "missing": []}


def test_the_tables_mark_the_row_and_name_the_seed():
    res = _res()
    note = "ml-1m-ts70 / sasrec seed1 (0.0249 against a median of 0.1260)"
    assert note in markdown(res)
    assert "0.0967 ± 0.0624 (3) †" in headline(res)
    assert "| sasrec | 2 (0.0967) † |" in cross_domain(res)
    assert "| fuxi-alpha | 1 (0.1800) |" in cross_domain(res)  # an ordinary row is not marked
    page = "\n".join(main_sections(res))
    assert note in page
    clean = _res("sasrec, clean")
    clean["results"].append(_row("ml-1m-ts70", "sasrec, insert 10%", [_metrics(0.1, 0.09, s) for s in range(3)], []))
    assert "| ml-1m-ts70 | sasrec | 0.0967 ± 0.0624 (3) † |" in degradation_table(clean)
    assert any("so that model's ratios read as more robust than it is" in line for line in robustness_section(clean))
    assert "†" not in markdown({**res, "results": res["results"][1:]})

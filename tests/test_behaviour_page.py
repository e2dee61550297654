"""The results page's behaviour answer: behaviour-aware against plain, per dataset, model and target."""

from fuxi_mme.experiments.page import behaviour_section
from fuxi_mme.experiments.tables import behaviour_comparison


def _row(variant: str, mean: float, std: float, seeds: int = 3, dataset: str = "demo") -> dict:
    return {"dataset": dataset, "variant": variant, "protocol": "loo-val", "seeds": seeds, "test/NDCG@10": {"mean": mean, "std": std}}


def test_pairs_are_compared_with_welch_and_read_at_five_percent():
    res = {
        "results": [
            _row("fuxi-alpha next", 0.50, 0.01),
            _row("fuxi-alpha+behaviour next", 0.55, 0.01),  # t = 6.1: ahead
            _row("fuxi-mme next target", 0.40, 0.02),
            _row("fuxi-mme+behaviour next target", 0.39, 0.02),  # t = -0.6: level
            _row("fuxi-mme next", 0.45, 0.01),  # its pair has not finished: not listed
        ]
    }
    lines = behaviour_comparison(res).splitlines()
    assert len(lines) == 4
    assert lines[2].startswith("| demo | fuxi-alpha | next | 0.5000 ± 0.0100 (3) | 0.5500 ± 0.0100 (3) | +0.0500 | 6.1 (4.0) | ahead |")
    assert lines[3].startswith("| demo | fuxi-mme | next target | 0.4000 ± 0.0200 (3) | 0.3900 ± 0.0200 (3) | -0.0100 | -0.6 (4.0) | level |")


def test_one_seed_is_not_tested():
    res = {"results": [_row("fuxi-alpha next", 0.50, 0.0, seeds=1), _row("fuxi-alpha+behaviour next", 0.55, 0.0, seeds=3)]}
    assert behaviour_comparison(res).splitlines()[2].endswith("| +0.0500 | - | one seed: not tested |")


def test_no_finished_pair_no_section():
    assert behaviour_comparison({"results": [_row("fuxi-alpha next", 0.5, 0.01)]}) == ""
    assert behaviour_section({"results": []}) == []


def test_the_answer_in_words_counts_the_readings_per_dataset():
    from fuxi_mme.experiments.tables import behaviour_answer

    res = {
        "results": [
            _row("fuxi-alpha next", 0.50, 0.01),
            _row("fuxi-alpha+behaviour next", 0.55, 0.01),  # ahead
            _row("fuxi-mme next target", 0.40, 0.02),
            _row("fuxi-mme+behaviour next target", 0.39, 0.02),  # level, lower mean
            _row("fuxi-alpha next", 0.10, 0.01, dataset="ml-100k"),
            _row("fuxi-alpha+behaviour next", 0.101, 0.01, dataset="ml-100k"),  # level, higher mean
            _row("fuxi-mme next", 0.10, 0.01, seeds=1, dataset="ml-100k"),
            _row("fuxi-mme+behaviour next", 0.20, 0.01, dataset="ml-100k"),  # one seed: left out
        ]
    }
    demo, ml = behaviour_answer(res).strip().split("\n\n")
    assert demo == (
        "**demo**: with behaviours as input, ahead in 1, behind in 0 and level in 1 of the 2 pairs with at least 2 seeds "
        "a side: a gain in some pairs, a loss in none; the behaviour-aware mean is the higher in 1 of 2."
    )
    assert ml.startswith("**ml-100k**: with behaviours as input, ahead in 0, behind in 0 and level in 1 of the 1 pair with")
    assert "no difference beyond seed noise; the behaviour-aware mean is the higher in 1 of 1." in ml
    assert demo in "\n".join(behaviour_section(res))

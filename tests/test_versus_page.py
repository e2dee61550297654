"""The results page's pair comparisons: the state-space hybrid against attention (mixer suite) and
the state-space model against the attention models (main suite)."""

from fuxi_mme.experiments.page import MIXER_PAIRS, MIXER_PROSE, SSM_PAIRS, main_sections, versus_section
from fuxi_mme.experiments.tables import versus_table


def _row(variant: str, mean: float, std: float, seeds: int = 3, dataset: str = "ml-1m-ts70", secs: float | None = 100.0) -> dict:
    e = {"dataset": dataset, "variant": variant, "protocol": "loo-val", "seeds": seeds, "test/NDCG@10": {"mean": mean, "std": std}}
    if secs is not None:
        e["train_seconds"] = {"mean": secs, "std": 1.0}
    return e


def test_hybrid_pairs_are_compared_with_welch_and_carry_their_cost():
    res = {
        "results": [
            _row("fuxi-alpha", 0.178, 0.002, secs=143),
            _row("fuxi-alpha hybrid", 0.190, 0.002, secs=415),  # t = 7.3: ahead
            _row("fuxi-mme", 0.181, 0.004),
            _row("fuxi-mme hybrid", 0.180, 0.002),  # t = -0.4: level
            _row("fuxi-alpha", 0.10, 0.01, dataset="ml-100k"),  # its hybrid has not finished: not listed
            {"dataset": "ml-100k", "variant": "fuxi-alpha hybrid", "protocol": "loo-val", "seeds": 0},
        ]
    }
    lines = versus_table(res, MIXER_PAIRS).splitlines()
    assert len(lines) == 4
    assert lines[2] == (
        "| ml-1m-ts70 | fuxi-alpha hybrid against fuxi-alpha | 0.1780 ± 0.0020 (3) | 0.1900 ± 0.0020 (3) | +0.0120 | 7.3 (4.0) | ahead | 143 / 415 |"
    )
    assert lines[3].startswith(
        "| ml-1m-ts70 | fuxi-mme hybrid against fuxi-mme | 0.1810 ± 0.0040 (3) | 0.1800 ± 0.0020 (3) | -0.0010 | -0.4 (2.9) | level |"
    )


def test_without_seconds_and_with_one_seed():
    res = {"results": [_row("fuxi-alpha", 0.178, 0.0, seeds=1), _row("ssm", 0.140, 0.009)]}
    lines = versus_table(res, SSM_PAIRS, seconds=False).splitlines()
    assert lines[0].endswith("| reading at 5% |")
    assert lines[2] == "| ml-1m-ts70 | ssm against fuxi-alpha | 0.1780 ± 0.0000 (1) | 0.1400 ± 0.0090 (3) | -0.0380 | - | one seed: not tested |"


def test_no_finished_pair_no_section():
    assert versus_table({"results": [_row("fuxi-alpha", 0.1, 0.01)]}, MIXER_PAIRS) == ""
    assert versus_section({"results": []}, MIXER_PROSE, MIXER_PAIRS) == []


def test_main_page_lists_the_state_space_comparison():
    res = {"results": [_row("fuxi-alpha", 0.178, 0.002), _row("ssm", 0.140, 0.002)]}
    text = "\n".join(main_sections(res))
    assert "### The state-space model against the attention models" in text
    assert "| ml-1m-ts70 | ssm against fuxi-alpha |" in text

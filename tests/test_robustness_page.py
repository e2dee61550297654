"""The results page's robustness answer: degradation relative to each model's clean figure, the
four-group Welch test of Fuxi-MME's drop against FuXi-alpha's, the sentences and the plot."""

import math

import pytest

from fuxi_mme.experiments.robustness import (
    CONDITIONS,
    MODELS,
    degradation_table,
    drop_difference,
    parse_variant,
    plot_robustness,
    robustness_answers,
    robustness_comparison,
    robustness_section,
)
from fuxi_mme.experiments.stats import t_critical, welch, welch_contrast


def _row(dataset: str, variant: str, mean: float, std: float, seeds: int = 3) -> dict:
    return {"dataset": dataset, "variant": variant, "protocol": "loo-val", "seeds": seeds, "test/NDCG@10": {"mean": mean, "std": std}}


def _planned(dataset: str, variant: str) -> dict:
    """An entry whose runs have not finished: no metric keys."""
    return {"dataset": dataset, "variant": variant, "protocol": "loo-val", "seeds": 0}


def _model(dataset: str, model: str, clean: float, ratios: dict[str, float], std: float) -> list[dict]:
    return [_row(dataset, f"{model}, clean", clean, std)] + [_row(dataset, f"{model}, {c}", clean * ratios.get(c, 1.0), std) for c in CONDITIONS]


def _complete() -> dict:
    """ml-1m-ts70: Fuxi-MME loses 5% everywhere, FuXi-alpha 20% (clearly more robust); the filter
    as plain Fuxi-MME (level). amazon-beauty: Fuxi-MME and FuXi-alpha both lose 10% (level); the
    filter loses 40% under insert 40% (less robust there, level elsewhere)."""
    ml, az = "ml-1m-ts70", "amazon-beauty"
    rows = []
    for m in ("sasrec", "hstu"):
        rows += _model(ml, m, 0.15, dict.fromkeys(CONDITIONS, 0.9), 0.002)
        rows += _model(az, m, 0.04, dict.fromkeys(CONDITIONS, 0.9), 0.003)
    rows += _model(ml, "fuxi-alpha", 0.20, dict.fromkeys(CONDITIONS, 0.80), 0.002)
    rows += _model(ml, "fuxi-mme", 0.20, dict.fromkeys(CONDITIONS, 0.95), 0.002)
    rows += _model(ml, "fuxi-mme filter", 0.20, dict.fromkeys(CONDITIONS, 0.95), 0.002)
    rows += _model(az, "fuxi-alpha", 0.05, dict.fromkeys(CONDITIONS, 0.9), 0.003)
    rows += _model(az, "fuxi-mme", 0.05, dict.fromkeys(CONDITIONS, 0.9), 0.003)
    rows += _model(az, "fuxi-mme filter", 0.05, {**dict.fromkeys(CONDITIONS, 0.9), "insert 40%": 0.6}, 0.003)
    # the token gate runs clean and under insert 40% only: on ml-1m-ts70 it loses 30% there (less robust)
    rows += [_row(ml, "fuxi-mme gate, clean", 0.20, 0.002), _row(ml, "fuxi-mme gate, insert 40%", 0.14, 0.002)]
    return {"results": rows}


def test_four_group_welch_known_answer():
    # d = (0.40 - 0.50) - (0.30 - 0.45) = 0.05; v = (4, 1, 9, 1)e-4 / 3, sum 5e-4: t = 0.05 / sqrt(5e-4) = sqrt(5);
    # df = (5e-4)^2 / sum(v^2 / 2) = 25e-8 / ((16 + 1 + 81 + 1)e-8 / 9 / 2) = 50 / 11
    fc, fn = {"mean": 0.50, "std": 0.01}, {"mean": 0.40, "std": 0.02}
    sc, sn = {"mean": 0.45, "std": 0.01}, {"mean": 0.30, "std": 0.03}
    d, t, df = welch_contrast([(1.0, fn, 3), (-1.0, fc, 3), (-1.0, sn, 3), (1.0, sc, 3)])
    assert d == pytest.approx(0.05)
    assert t == pytest.approx(math.sqrt(5))
    assert df == pytest.approx(50 / 11)
    assert t < t_critical(df) == 2.776  # df 4.5 reads at 4: level
    e = lambda m, n=3: {"seeds": n, "test/NDCG@10": m}  # noqa: E731
    assert drop_difference((e(fc), e(fn)), (e(sc), e(sn))) == pytest.approx((0.05, math.sqrt(5), 50 / 11))
    # unequal seeds: v = 0.01^2 / 2 and 0.02^2 / 5 on the two non-zero groups
    d, t, df = welch_contrast([(1.0, {"mean": 0.3, "std": 0.01}, 2), (-1.0, {"mean": 0.1, "std": 0.02}, 5), (1.0, {"mean": 0.0, "std": 0.0}, 3)])
    v1, v2 = 0.01**2 / 2, 0.02**2 / 5
    assert (d, t, df) == pytest.approx((0.2, 0.2 / math.sqrt(v1 + v2), (v1 + v2) ** 2 / (v1**2 / 1 + v2**2 / 4)))
    # two groups, +1 and -1: the page's Welch test (which is computed by it), by hand
    a, b = {"mean": 0.55, "std": 0.01}, {"mean": 0.50, "std": 0.02}
    va, vb = 0.01**2 / 3, 0.02**2 / 4
    by_hand = (0.05 / math.sqrt(va + vb), (va + vb) ** 2 / (va**2 / 2 + vb**2 / 3))
    assert welch_contrast([(1.0, a, 3), (-1.0, b, 4)])[1:] == pytest.approx(by_hand) == welch(a, 3, b, 4)
    # no spread anywhere
    assert welch_contrast([(1.0, {"mean": 0.2, "std": 0.0}, 3), (-1.0, {"mean": 0.1, "std": 0.0}, 3)])[1:] == (math.inf, 4.0)


def test_variant_names():
    assert parse_variant("fuxi-mme filter, drop 50%") == ("fuxi-mme filter", "drop 50%")
    assert parse_variant("sasrec, last 20 events") == ("sasrec", "last 20 events")
    assert parse_variant("fuxi-mme") is None


def test_nothing_until_a_pair_is_complete(tmp_path):
    assert robustness_section({"results": []}, tmp_path) == []
    only_clean = {"results": [_row("ml-1m-ts70", f"{m}, clean", 0.2, 0.01) for m in MODELS]}
    # a perturbed row without its clean row, and planned entries without metrics
    orphan = [_row("amazon-beauty", "fuxi-mme, insert 10%", 0.04, 0.01), _planned("ml-1m-ts70", "fuxi-mme, insert 10%")]
    res = {"results": only_clean["results"] + orphan}
    assert degradation_table(res) == ""
    assert robustness_comparison(res) == ""
    assert robustness_answers(res) == []
    assert robustness_section(res, tmp_path) == []
    assert plot_robustness(res, tmp_path / "robustness.png") is None
    assert not list(tmp_path.iterdir())


def rows_gate(lines: list[str]) -> str:
    return next(line for line in lines if line.startswith("| ml-1m-ts70 | fuxi-mme gate |"))


def test_degradation_table_ratios_and_missing_cells():
    res = _complete()
    res["results"] = [e for e in res["results"] if e["variant"] != "hstu, drop 50%" or e["dataset"] != "ml-1m-ts70"]
    lines = degradation_table(res).splitlines()
    assert lines[0] == "| dataset | model | clean | insert 10% | insert 20% | insert 40% | last 20 events | drop 50% |"
    assert len(lines) == 2 + 2 * len(MODELS) - 1  # no gate rows on amazon-beauty: left out
    assert rows_gate(lines) == "| ml-1m-ts70 | fuxi-mme gate | 0.2000 ± 0.0020 (3) | - | - | 0.70 (−30%) | - | - |"
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in lines[2:]}
    assert rows[("ml-1m-ts70", "fuxi-alpha")] == "| ml-1m-ts70 | fuxi-alpha | 0.2000 ± 0.0020 (3) | " + " | ".join(["0.80 (−20%)"] * 5) + " |"
    assert rows[("ml-1m-ts70", "fuxi-mme")].endswith("| 0.95 (−5%) | 0.95 (−5%) |")
    assert rows[("ml-1m-ts70", "hstu")].endswith("| 0.90 (−10%) | - |")  # not run
    assert rows[("amazon-beauty", "fuxi-mme filter")].split(" | ")[5] == "0.60 (−40%)"


def test_clearly_more_robust_and_level():
    res = _complete()
    table = robustness_comparison(res).splitlines()
    # ml-1m-ts70 insert 10%: Fuxi-MME -0.0100 (-5%), FuXi-alpha -0.0400 (-20%), d = +0.03,
    # se = sqrt(4 * 0.002^2 / 3), t = 13.0; four equal groups: df = (4 v)^2 / (4 v^2 / 2) = 8
    se = math.sqrt(4 * 0.002**2 / 3)
    t = 0.03 / se
    assert f"{t:.1f}" == "13.0"
    assert table[2] == (
        f"| ml-1m-ts70 | insert 10% | fuxi-mme against fuxi-alpha | -0.0100 (−5%) | -0.0400 (−20%) | +0.0300 | {t:.1f} (8.0) | more robust |"
    )
    az = [line for line in table if line.startswith("| amazon-beauty | insert 40% |")]
    assert az[0].endswith("| -0.0050 (−10%) | -0.0050 (−10%) | +0.0000 | 0.0 (8.0) | level |")
    assert az[1].startswith("| amazon-beauty | insert 40% | fuxi-mme filter against fuxi-mme | -0.0200 (−40%) | -0.0050 (−10%) | -0.0150 |")
    assert az[1].endswith("| less robust |")
    assert len(table) == 2 + 2 * 2 * len(CONDITIONS) + 1  # the gate: one condition, one dataset
    (gate,) = [line for line in table if "fuxi-mme gate against" in line]
    assert gate.startswith("| ml-1m-ts70 | insert 40% | fuxi-mme gate against fuxi-mme | -0.0600 (−30%) | -0.0100 (−5%) | -0.0500 |")
    assert gate.endswith("| less robust |")

    every = "insert 10%, insert 20%, insert 40%, last 20 events, drop 50%"
    assert robustness_answers(res) == [
        f"**ml-1m-ts70**: of the 5 conditions tested, Fuxi-MME is more robust than FuXi-alpha under 5 ({every}), "
        "less robust under none and level under none: Fuxi-MME is the more robust of the two here.",
        "**ml-1m-ts70**: of the 5 conditions tested, Fuxi-MME with the noise filter is more robust than plain Fuxi-MME under none, "
        f"less robust under none and level under 5 ({every}): no difference in robustness beyond seed noise.",
        "**ml-1m-ts70**: of the 1 condition tested, Fuxi-MME with the token gate is more robust than plain Fuxi-MME under none, "
        "less robust under 1 (insert 40%) and level under none: plain Fuxi-MME is the more robust of the two here.",
        "**amazon-beauty**: of the 5 conditions tested, Fuxi-MME is more robust than FuXi-alpha under none, "
        f"less robust under none and level under 5 ({every}): no difference in robustness beyond seed noise.",
        "**amazon-beauty**: of the 5 conditions tested, Fuxi-MME with the noise filter is more robust than plain Fuxi-MME under none, "
        "less robust under 1 (insert 40%) and level under 4 (insert 10%, insert 20%, last 20 events, drop 50%): "
        "plain Fuxi-MME is more robust only under insert 40%, level elsewhere: weak evidence, since each of the 5 tests is at 5% "
        "without correction for testing several.",
    ]


def test_less_robust_mixed_and_one_seed():
    rows = [
        _row("demo", "fuxi-alpha, clean", 0.20, 0.002),
        _row("demo", "fuxi-alpha, insert 10%", 0.16, 0.002),
        _row("demo", "fuxi-alpha, insert 20%", 0.19, 0.002),
        _row("demo", "fuxi-mme, clean", 0.20, 0.002),
        _row("demo", "fuxi-mme, insert 10%", 0.19, 0.002),  # lost 5% against 20%
        _row("demo", "fuxi-mme, insert 20%", 0.15, 0.002),  # lost 25% against 5%
        _row("demo", "fuxi-alpha, drop 50%", 0.15, 0.0, seeds=1),
        _row("demo", "fuxi-mme, drop 50%", 0.18, 0.002),
    ]
    res = {"results": rows}
    lines = robustness_comparison(res).splitlines()
    assert lines[2].endswith("| +0.0300 | 13.0 (8.0) | more robust |")
    assert lines[3].endswith("| -0.0400 | -17.3 (8.0) | less robust |")
    assert lines[4].endswith("| +0.0300 | - | not tested: one seed of fuxi-alpha, drop 50% |")
    assert robustness_answers(res) == [
        "**demo**: of the 2 conditions tested, Fuxi-MME is more robust than FuXi-alpha under 1 (insert 10%), less robust under 1 "
        "(insert 20%) and level under none; 1 more not tested (a row with one seed): the answer depends on the condition."
    ]
    del rows[4], rows[1]  # insert 10% gone: less robust only
    assert robustness_answers(res) == [
        "**demo**: of the 1 condition tested, Fuxi-MME is more robust than FuXi-alpha under none, less robust under 1 (insert 20%) "
        "and level under none; 1 more not tested (a row with one seed): FuXi-alpha is the more robust of the two here."
    ]
    one_seed = {"results": [rows[0], rows[2], rows[4], rows[5]]}  # drop 50% only
    assert robustness_answers(one_seed) == ["**demo**: Fuxi-MME against FuXi-alpha: 1 condition run, not tested: a row it needs has one seed."]


def test_section_without_a_comparison_pair():
    res = {"results": [_row("demo", "sasrec, clean", 0.2, 0.01), _row("demo", "sasrec, last 20 events", 0.1, 0.01)]}
    lines = "\n".join(robustness_section(res)).splitlines()
    assert "| demo | sasrec | 0.2000 ± 0.0100 (3) | - | - | - | 0.50 (−50%) | - |" in lines
    assert not any(line.startswith("| demo | fuxi-mme |") for line in lines)  # no row of it run here: left out
    assert not any("Welch t (df)" in line or line.startswith("**demo**") for line in lines)
    assert not any(line.startswith("![") for line in lines)  # no folder: no plot


def test_section_links_the_plot_only_when_written(tmp_path, monkeypatch):
    res = _complete()
    lines = robustness_section(res, tmp_path)
    text = "\n".join(lines)
    assert lines[0].startswith("### Is Fuxi-MME more robust?")
    assert text.index("| dataset | model | clean |") < text.index("| dataset | condition |") < text.index("**ml-1m-ts70**")
    written = (tmp_path / "robustness.png").exists()
    assert ("![robustness](robustness.png)" in lines) == written
    # without matplotlib: no file, no link, the tables stay
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    out = tmp_path / "none"
    out.mkdir()
    lines = robustness_section(res, out)
    assert "![robustness](robustness.png)" not in lines and not list(out.iterdir())
    assert "| dataset | model | clean | insert 10% | insert 20% | insert 40% | last 20 events | drop 50% |" in "\n".join(lines)


def test_plot_is_written(tmp_path):
    pytest.importorskip("matplotlib")
    out = plot_robustness(_complete(), tmp_path / "robustness.png")
    assert out == tmp_path / "robustness.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["robustness.png"]  # the temporary file is gone
    lines = robustness_section(_complete(), tmp_path)
    assert "![robustness](robustness.png)" in lines


def test_results_page_carries_the_robustness_section_and_plot(tmp_path):
    import json

    from fuxi_mme.experiments.page import write_docs

    res = {"suite": "robustness", "description": "robustness", "commit": "abc", "time": "now", **_complete()}
    (tmp_path / "robustness.json").write_text(json.dumps(res))
    doc = write_docs(tmp_path, tmp_path / "docs" / "results.md").read_text()
    assert "### Is Fuxi-MME more robust?" in doc
    pytest.importorskip("matplotlib")
    assert (tmp_path / "docs" / "robustness.png").is_file()
    assert "![robustness](robustness.png)" in doc


def test_history_buckets_are_aggregated_and_tabled(tmp_path):
    from fuxi_mme.experiments.aggregate import _row
    from fuxi_mme.experiments.robustness import bucket_table

    def run(seed: int, short: float) -> dict:
        buckets = {"short": {"users": 10 + seed, "NDCG@10": short}, "medium": {"users": 5, "NDCG@10": 0.2}, "long": {"users": 1, "NDCG@10": 0.3}}
        return {"protocol": "loo-val", "run_dir": str(tmp_path / f"seed{seed}"), "test": {"NDCG@10": 0.1, "buckets": buckets}}

    entry = _row("ml-1m-ts70", "fuxi-mme, last 20 events", [run(0, 0.1), run(1, 0.2)], [])
    assert entry["test/short/NDCG@10"]["mean"] == pytest.approx(0.15) and entry["test/short/users"] == 10.5
    assert entry["test/long/NDCG@10"] == {"mean": 0.3, "std": 0.0}
    # a run without buckets (made before they existed): no bucket cells for the row
    assert "test/short/NDCG@10" not in _row("x", "v", [run(0, 0.1), {"protocol": "loo-val", "run_dir": "r", "test": {"NDCG@10": 0.1}}], [])
    lines = bucket_table({"results": [entry, _row("ml-1m-ts70", "fuxi-mme, clean", [run(0, 0.3)], [])]}).splitlines()
    assert lines[2] == "| ml-1m-ts70 | fuxi-mme | clean | 0.3000 (10) | 0.2000 (5) | 0.3000 (1) |"
    assert lines[3] == "| ml-1m-ts70 | fuxi-mme | last 20 events | 0.1500 (10) | 0.2000 (5) | 0.3000 (1) |"
    assert bucket_table({"results": [_row("x", "fuxi-mme, clean", [{"protocol": "loo-val", "run_dir": "r", "test": {"NDCG@10": 0.1}}], [])]}) == ""

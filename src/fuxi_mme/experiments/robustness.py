"""The ``robustness`` suite's answer on the results page: each model's test NDCG@10 under noisy
and sparse training data relative to its own clean figure, the plot of it, and whether Fuxi-MME
loses less than FuXi-alpha (and the noise filter or the token gate less than plain Fuxi-MME)
beyond seed noise.

Variants are named ``"<model>, <condition>"`` (``"fuxi-mme filter, drop 50%"``,
``src/fuxi_mme/experiments/suites/robustness.yaml``). Everything here shows nothing until a
model has its clean row and at least one perturbed row on a dataset, and fills in as runs land.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..eval.buckets import BUCKET_NAMES
from .plots import pyplot, save_figure
from .stats import reading, welch_contrast
from .tables import low_seeds_line

METRIC = "test/NDCG@10"
MODELS = ("sasrec", "hstu", "fuxi-alpha", "fuxi-mme", "fuxi-mme filter", "fuxi-mme gate")
CLEAN = "clean"
NOISE = {"insert 10%": 10, "insert 20%": 20, "insert 40%": 40}  # condition -> inserted items, %
SPARSE = ("last 20 events", "drop 50%")
CONDITIONS = (*NOISE, *SPARSE)
# (first, second): is the first more robust than the second? Fuxi-MME against FuXi-alpha, and each
# noise-decoupling design (model.denoise=filter, =gate) against Fuxi-MME without it.
PAIRS = (("fuxi-mme", "fuxi-alpha"), ("fuxi-mme filter", "fuxi-mme"), ("fuxi-mme gate", "fuxi-mme"))
NAMES = {
    "fuxi-mme": "Fuxi-MME",
    "fuxi-alpha": "FuXi-alpha",
    "fuxi-mme filter": "Fuxi-MME with the noise filter",
    "fuxi-mme gate": "Fuxi-MME with the token gate",
}
WORDS = {"ahead": "more robust", "behind": "less robust", "level": "level"}

Cells = dict[tuple[str, str, str], dict[str, Any]]


def parse_variant(variant: str) -> tuple[str, str] | None:
    """``"fuxi-mme filter, insert 10%"`` -> ``("fuxi-mme filter", "insert 10%")``; None for a
    name not of that form."""
    model, sep, cond = variant.partition(", ")
    return (model.strip(), cond.strip()) if sep and model.strip() and cond.strip() else None


def _cells(res: dict[str, Any]) -> Cells:
    """(dataset, model, condition) -> entry, for the entries that have the metric."""
    out: Cells = {}
    for e in res.get("results", []):
        mc = parse_variant(e["variant"])
        if mc is not None and METRIC in e:
            out[(e["dataset"], mc[0], mc[1])] = e
    return out


def _datasets(res: dict[str, Any]) -> list[str]:
    return list(dict.fromkeys(e["dataset"] for e in res.get("results", [])))


def _ratio(cells: Cells, ds: str, model: str, cond: str) -> tuple[float, float] | None:
    """(noisy mean / clean mean, noisy std / clean mean) of a model under ``cond``; None when
    either row has not run (or the clean mean is 0)."""
    clean, noisy = cells.get((ds, model, CLEAN)), cells.get((ds, model, cond))
    if clean is None or noisy is None or clean[METRIC]["mean"] == 0:
        return None
    c = clean[METRIC]["mean"]
    return noisy[METRIC]["mean"] / c, noisy[METRIC]["std"] / c


def _pct(ratio: float) -> str:
    """0.93 -> "−7%", 1.02 -> "+2%" (a true minus sign), "0%" when it rounds to nothing."""
    p = round((ratio - 1) * 100)
    return "0%" if p == 0 else f"+{p}%" if p > 0 else f"−{-p}%"


def _complete(cells: Cells, ds: str) -> bool:
    return any(_ratio(cells, ds, m, c) is not None for m in MODELS for c in CONDITIONS)


def degradation_table(res: dict[str, Any]) -> str:
    """One row per (dataset, model): the clean test NDCG@10 (mean ± std, seeds) and under each
    condition the ratio to that clean mean with the relative change, "-" where a row has not
    run; models without a clean row on a dataset, and datasets where no model has a clean row
    and a perturbed row, are left out; "" when none has."""
    cells = _cells(res)
    lines = []
    for ds in _datasets(res):
        if not _complete(cells, ds):
            continue
        for model in MODELS:
            if (ds, model, CLEAN) not in cells:  # no clean row: nothing to compare against (or nothing run)
                continue
            clean = cells[(ds, model, CLEAN)]
            mark = " †" if clean.get("low_seeds") else ""
            row = [f"{clean[METRIC]['mean']:.4f} ± {clean[METRIC]['std']:.4f} ({clean['seeds']}){mark}"]
            for cond in CONDITIONS:
                r = _ratio(cells, ds, model, cond)
                row.append("-" if r is None else f"{r[0]:.2f} ({_pct(r[0])})")
            lines.append(f"| {ds} | {model} | " + " | ".join(row) + " |")
    if not lines:
        return ""
    head = ["| dataset | model | clean | " + " | ".join(CONDITIONS) + " |", "|---|---|---|" + "---|" * len(CONDITIONS)]
    return "\n".join(head + lines) + "\n"


BUCKET_PROSE = [
    "By history length: test NDCG@10 (mean over seeds) of the users whose evaluation history is short (< 10 events),",
    "medium (10-49) or long (>= 50; docs/training.md#history-length-buckets), with each bucket's mean user count; the",
    "histories are the evaluated ones (clean, so the buckets hold the same users under every training condition).",
    "",
]


def bucket_table(res: dict[str, Any]) -> str:
    """Test NDCG@10 per history-length bucket for every (dataset, model, condition) whose runs
    recorded buckets, clean first; "" when none did."""
    cells = _cells(res)
    lines = []
    for ds in _datasets(res):
        for model in MODELS:
            for cond in (CLEAN, *CONDITIONS):
                e = cells.get((ds, model, cond))
                if e is None or not all(f"test/{b}/NDCG@10" in e for b in BUCKET_NAMES):
                    continue
                row = [f"{e[f'test/{b}/NDCG@10']['mean']:.4f} ({e.get(f'test/{b}/users', 0):,.0f})" for b in BUCKET_NAMES]
                lines.append(f"| {ds} | {model} | {cond} | " + " | ".join(row) + " |")
    if not lines:
        return ""
    head = ["| dataset | model | condition | short: NDCG@10 (users) | medium | long |", "|---|---|---|---|---|---|"]
    return "\n".join(head + lines) + "\n"


def drop_difference(first: tuple[dict[str, Any], dict[str, Any]], second: tuple[dict[str, Any], dict[str, Any]]) -> tuple[float, float, float]:
    """(d, t, df) of d = (first_cond - first_clean) - (second_cond - second_clean) on test
    NDCG@10, each side given as ``(clean entry, perturbed entry)``: Welch's t over the four
    groups' seeds (standard error the root of the sum of the four std^2 / n) and its
    Welch-Satterthwaite degrees of freedom. d > 0: the first lost less (or gained more)."""
    (fc, fn), (sc, sn) = first, second
    signed = ((1.0, fn), (-1.0, fc), (-1.0, sn), (1.0, sc))
    return welch_contrast([(c, e[METRIC], e["seeds"]) for c, e in signed])


def _drop_cell(clean: dict[str, Any], noisy: dict[str, Any]) -> str:
    c, n = clean[METRIC]["mean"], noisy[METRIC]["mean"]
    return f"{n - c:+.4f} ({_pct(n / c)})" if c else f"{n - c:+.4f}"


def _comparison_rows(res: dict[str, Any]) -> list[tuple[str, str, str, str, str, str]]:
    """(dataset, first, second, condition, reading or "not tested", table line) of every
    comparison whose four rows have run."""
    cells = _cells(res)
    out = []
    for ds in _datasets(res):
        for first, second in PAIRS:
            for cond in CONDITIONS:
                rows = [cells.get((ds, m, c)) for m in (first, second) for c in (CLEAN, cond)]
                if any(r is None for r in rows):
                    continue
                fc, fn, sc, sn = (r for r in rows if r is not None)
                d, t, df = drop_difference((fc, fn), (sc, sn))
                named = zip(((first, CLEAN), (first, cond), (second, CLEAN), (second, cond)), (fc, fn, sc, sn))
                lone = [f"{m}, {c}" for (m, c), r in named if r["seeds"] < 2]
                if lone:  # no spread to test against
                    word, test = "not tested", f"- | not tested: one seed of {'; '.join(lone)}"
                else:
                    word = WORDS[reading(t, df)]
                    test = f"{t:.1f} ({df:.1f}) | {word}"
                line = f"| {ds} | {cond} | {first} against {second} | {_drop_cell(fc, fn)} | {_drop_cell(sc, sn)} | {d:+.4f} | {test} |"
                out.append((ds, first, second, cond, word, line))
    return out


def robustness_comparison(res: dict[str, Any]) -> str:
    """For every dataset and perturbed condition where all four rows have run: Fuxi-MME's change
    from clean against FuXi-alpha's (and the filter's and the gate's against plain Fuxi-MME's), absolute and
    relative, their difference, Welch's t over the four groups' seeds and its reading at 5%
    ("more robust" / "less robust" / "level"); "" when no comparison is complete."""
    lines = [row[5] for row in _comparison_rows(res)]
    if not lines:
        return ""
    head = [
        "| dataset | condition | first against second | first: change from clean | second: change from clean "
        "| difference of changes | Welch t (df) | reading at 5% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines) + "\n"


def _under(conds: list[str]) -> str:
    return f"{len(conds)} ({', '.join(conds)})" if conds else "none"


def _one_sided(winner: str, conds: list[str], n: int) -> str:
    """The verdict when every condition that differs favours ``winner``: stated outright only
    when that is most of the ``n`` tested; otherwise said to be weak (each test is at 5% with
    no correction for testing several conditions, so one of five differing is close to chance)."""
    if 2 * len(conds) > n:
        return f"{winner} is the more robust of the two here"
    return (
        f"{winner} is more robust only under {', '.join(conds)}, level elsewhere: weak evidence, since each of the "
        f"{n} tests is at 5% without correction for testing several"
    )


def robustness_answers(res: dict[str, Any]) -> list[str]:
    """One sentence per dataset and pair that has a complete comparison: under how many of the
    conditions run the first model is more robust than the second, less robust, or level at 5%,
    and what that says (a model is called the more robust only when it is under most of the
    conditions tested and less robust under none); [] when none is complete."""
    found: dict[tuple[str, str, str], dict[str, list[str]]] = {}
    for ds, first, second, cond, word, _ in _comparison_rows(res):
        found.setdefault((ds, first, second), {}).setdefault(word, []).append(cond)
    out = []
    for (ds, first, second), by in found.items():
        a, b = NAMES.get(first, first), NAMES.get(second, second)
        if second == "fuxi-mme" and first.startswith("fuxi-mme "):  # an option against the model without it
            b = f"plain {b}"
        more, less, level, untested = (by.get(w, []) for w in ("more robust", "less robust", "level", "not tested"))
        n = len(more) + len(less) + len(level)
        if not n:
            k = len(untested)
            runs, need = ("conditions", "they need") if k > 1 else ("condition", "it needs")
            out.append(f"**{ds}**: {a} against {b}: {k} {runs} run, not tested: a row {need} has one seed.")
            continue
        if more and not less:
            verdict = _one_sided(a, more, n)
        elif less and not more:
            verdict = _one_sided(b, less, n)
        elif more and less:
            verdict = "the answer depends on the condition"
        else:
            verdict = "no difference in robustness beyond seed noise"
        skipped = f"; {len(untested)} more not tested (a row with one seed)" if untested else ""
        out.append(
            f"**{ds}**: of the {n} condition{'s' if n > 1 else ''} tested, {a} is more robust than {b} under {_under(more)}, "
            f"less robust under {_under(less)} and level under {_under(level)}{skipped}: {verdict}."
        )
    return out


ROBUSTNESS_PROSE = [
    "### Is Fuxi-MME more robust? Test NDCG@10 under noisy and sparse training data",
    "",
    "Each model trained on the clean data, with 10%, 20% and 40% random items inserted into the training part, on",
    "each user's last 20 training events and with half of the training events dropped (docs/training.md#robustness-protocols);",
    "validation and test targets and histories stay clean. The first column is the clean test NDCG@10 (mean ± std,",
    "seeds in parentheses), the others each condition's mean relative to the same model's clean mean (the change in",
    'parentheses); "-" where a row has not run (the suite\'s table below says which are planned). "fuxi-mme filter"',
    'and "fuxi-mme gate" are Fuxi-MME with noise decoupling (`model.denoise=filter` or `gate`, the two designs',
    "compared in docs/models.md#noise-decoupling).",
    "",
]
PLOT_PROSE = [
    "The plot: the same ratios, insertion noise on the top row (0% is the clean run), sparsity on the bottom row;",
    "error bars are the perturbed runs' std over seeds divided by the clean mean (at 0%, the clean runs' own std;",
    "the clean mean's spread is not propagated into the ratios). Points are shifted a little sideways per model.",
    "",
]
COMPARISON_PROSE = [
    "Does Fuxi-MME lose less than FuXi-alpha, and does the noise filter or the token gate make Fuxi-MME lose less? For each",
    "condition, the change from clean of each model (absolute, relative in parentheses) and the difference of the",
    "two changes, d = (first under the condition − first clean) − (second under the condition − second clean), on",
    "absolute test NDCG@10. Welch's t over the four rows' seeds (standard error the root of the sum of the four",
    'std²/n, Welch-Satterthwaite degrees of freedom for four groups, in parentheses): "more robust" (the first',
    'lost less) or "less robust" when a two-sided test at 5% rejects d = 0, otherwise "level". The sentences',
    'below call a model "the more robust" only when it is so under most of the conditions tested and less robust',
    "under none: the tests are not corrected for being several, so one difference among five is close to chance.",
    "",
]


def _color(model: str) -> str:
    """One colour per model in every panel and every dataset's column (matplotlib's cycle, by the model's place in MODELS)."""
    return f"C{MODELS.index(model)}"


def _noise_panel(ax: Any, cells: Cells, ds: str) -> None:
    """Insertion rate against NDCG@10 relative to clean, one line per model (1 at 0%), each
    model's points shifted a little sideways so that equal values stay visible."""
    for i, model in enumerate(MODELS):
        clean = cells.get((ds, model, CLEAN))
        pts = [(rate, _ratio(cells, ds, model, cond)) for cond, rate in NOISE.items()]
        got = [(x, r) for x, r in pts if r is not None]
        if clean is None or not got:
            continue
        c = clean[METRIC]
        off = (i - (len(MODELS) - 1) / 2) * 0.6
        xs = [off, *(x + off for x, _ in got)]
        ys = [1.0, *(r[0] for _, r in got)]
        err = [c["std"] / c["mean"], *(r[1] for _, r in got)]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=model, color=_color(model))
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xticks([0, *NOISE.values()])
    ax.set(xlabel="random items inserted into training (%)", ylabel="test NDCG@10 / clean", title=f"{ds}: insertion noise")


def _sparse_panel(ax: Any, cells: Cells, ds: str) -> None:
    """Each sparsity condition as a point per model (offset sideways), relative to clean."""
    width = 0.8 / len(MODELS)
    for i, model in enumerate(MODELS):
        pts = [(j, _ratio(cells, ds, model, cond)) for j, cond in enumerate(SPARSE)]
        got = [(x, r) for x, r in pts if r is not None]
        if not got:
            continue
        off = (i - (len(MODELS) - 1) / 2) * width
        xs, ys, err = [x + off for x, _ in got], [r[0] for _, r in got], [r[1] for _, r in got]
        ax.errorbar(xs, ys, yerr=err, marker="s", ls="none", capsize=3, label=model, color=_color(model))
    ax.axhline(1.0, color="grey", lw=0.8, ls=":")
    ax.set_xticks(range(len(SPARSE)), list(SPARSE))
    ax.set_xlim(-0.6, len(SPARSE) - 0.4)
    ax.set(xlabel="sparse training data", ylabel="test NDCG@10 / clean", title=f"{ds}: sparsity")


def plot_robustness(res: dict[str, Any], out: Path) -> Path | None:
    """Write the robustness plot to ``out`` (PNG): a column per dataset, insertion noise on top
    and sparsity below; None without matplotlib or without a model that has a clean and a
    perturbed row."""
    cells = _cells(res)
    datasets = [ds for ds in _datasets(res) if _complete(cells, ds)]
    if not datasets:
        return None
    plt = pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(2, len(datasets), figsize=(5.5 * len(datasets), 8), squeeze=False)
    for j, ds in enumerate(datasets):
        _noise_panel(axes[0][j], cells, ds)
        _sparse_panel(axes[1][j], cells, ds)
    return save_figure(fig, axes, out)


def robustness_section(res: dict[str, Any], img_dir: Path | None = None) -> list[str]:
    """The robustness answer above the suite's table: the degradation table, the plot (written to
    ``img_dir/robustness.png`` and linked when ``img_dir`` is given and matplotlib is present),
    the Welch comparison and one sentence per dataset and pair; [] while no model has a clean
    and a perturbed row."""
    table = degradation_table(res)
    if not table:
        return []
    lines = [*ROBUSTNESS_PROSE, table, ""]
    low = low_seeds_line(res["results"])
    if low:  # a clean figure with a stalled seed understates the model, so its ratios overstate robustness
        lines += [low + " A † clean figure is lowered by such a seed, so that model's ratios read as more robust than it is.", ""]
    img = plot_robustness(res, img_dir / "robustness.png") if img_dir is not None else None
    if img is not None:
        lines += [*PLOT_PROSE, f"![robustness]({img.name})", ""]
    buckets = bucket_table(res)
    if buckets:
        lines += [*BUCKET_PROSE, buckets, ""]
    versus = robustness_comparison(res)
    if versus:
        lines += [*COMPARISON_PROSE, versus, ""]
        for sentence in robustness_answers(res):
            lines += [sentence, ""]
    return lines

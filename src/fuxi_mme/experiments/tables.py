"""Markdown tables of aggregated suites: a suite's full table, the headline pivot, Fuxi-MME
against FuXi-alpha at equal size, and against the published Amazon figures."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from .stats import reading, welch
from .suites import SUITES

HEADLINE_MODELS = ("popularity", "sasrec", "hstu", "fuxi-alpha", "fuxi-mme")
# test beyond-accuracy columns (aggregate.BEYOND_METRICS) and their short headers
BEYOND_COLUMNS = {"test/Coverage@10": "test Cov@10", "test/Gini@10": "test Gini@10", "test/Novelty@10": "test Nov@10", "test/ILD@10": "test ILD@10"}

# Quoted, not ours: docs/models.md#published-figures, independent benchmark, Amazon 5-core leave-one-out, NDCG@10.
PUBLISHED_AMAZON = {
    "amazon-beauty": {"SASRec+SS": 0.0531, "HSTU": 0.0439, "FuXi-alpha": 0.0451},
    "amazon-sports": {"SASRec+SS": 0.0314, "HSTU": 0.0243, "FuXi-alpha": 0.0244},
    "amazon-toys": {"SASRec+SS": 0.0580, "HSTU": 0.0450, "FuXi-alpha": 0.0437},
}


def short_hashes(text: str) -> str:
    """Full 40-digit commit hashes in ``text`` cut to 10 digits."""
    return re.sub(r"\b([0-9a-f]{10})[0-9a-f]{30}\b", r"\1", text)


def short_gpu(devices: list[str]) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``H100``; several joined by +."""
    out = []
    for d in devices:
        words = [w for w in d.replace("NVIDIA", "").split() if w]
        out.append(words[0] if words else d)
    return "+".join(dict.fromkeys(out)) or "-"


def _mean_std(e: dict[str, Any], key: str) -> str:
    return f"{e[key]['mean']:.4f} ± {e[key]['std']:.4f}" if key in e else "-"


def _beyond_cell(e: dict[str, Any], key: str) -> str:
    """Mean ± std of a beyond-accuracy column (novelty in bits: two decimals)."""
    if key not in e:
        return "-"
    d = 2 if "Novelty" in key else 4
    return f"{e[key]['mean']:.{d}f} ± {e[key]['std']:.{d}f}"


def beyond_columns(results: list[dict[str, Any]]) -> list[str]:
    """The beyond-accuracy columns any row has (none for runs from before them: the table stays as it was)."""
    return [k for k in BEYOND_COLUMNS if any(k in e for e in results)]


def _table_row(e: dict[str, Any], extra: list[str] | tuple[str, ...] = ()) -> str:
    p = e.get("parameters")
    params = f"{p['total']:,} ({p['non_embedding']:,})" if p else "-"
    ts = f"{e['train_seconds']['mean']:.0f}" if "train_seconds" in e else "-"
    beyond = "".join(f" {_beyond_cell(e, k)} |" for k in extra)
    return (
        f"| {e['dataset']} | {e['variant']} | {e['protocol']} | {e['seeds']} | "
        f"{_mean_std(e, 'valid_best/NDCG@10')} | {_mean_std(e, 'test/NDCG@10')} | "
        f"{_mean_std(e, 'test/HR@10')} | {_mean_std(e, 'test/MRR')} |{beyond} {params} | {ts} | {short_gpu(e.get('devices', []))} |"
    )


def low_seeds_line(results: list[dict[str, Any]]) -> str | None:
    """The note on rows holding a seed far below its siblings (``aggregate.low_seeds``), or None."""
    parts = [
        f"{e['dataset']} / {e['variant']} {m['seed']} ({m['valid NDCG@10']:.4f} against a median of {m['median']:.4f})"
        for e in results
        for m in e.get("low_seeds", [])
    ]
    if not parts:
        return None
    return (
        "Seeds far below their siblings (best validation NDCG@10 under half the row's median: runs that stopped "
        "learning early; kept in the mean and std, marked † in the summary tables): " + "; ".join(parts) + "."
    )


def _low_mark(e: dict[str, Any]) -> str:
    return " †" if e.get("low_seeds") else ""


def _left_out(res: dict[str, Any]) -> list[str]:
    """The notes under a suite's table: seeds far below their siblings, then failed, not
    applicable, stale and missing rows."""
    low = low_seeds_line(res.get("results", []))
    lines = ["", low] if low else []
    if res.get("failed"):
        lines += ["", "Failed runs: " + ", ".join(res["failed"])]
    if res.get("not_applicable"):
        lines += ["", "Not applicable (never run): " + "; ".join(f"{m['dataset']} / {m['variant']}: {m['why']}" for m in res["not_applicable"]) + "."]
    if res.get("stale"):
        lines += [
            "",
            "Left out, trained with settings the suite no longer asks for (running the suite again replaces them; "
            "settings a command gave with --set must be given again, or they read as changed): "
            + "; ".join(f"{m['dataset']} / {m['variant']} ({', '.join(m['changes'])})" for m in res["stale"])
            + ".",
        ]
    if res.get("missing"):
        lines += ["", missing_line(res)]
    return lines


def missing_line(res: dict[str, Any]) -> str:
    """The planned runs without a results file, per dataset: each variant with its number of
    runs, or "all N variants" for a dataset none of whose variants has run yet."""
    by_ds: dict[str, list[dict[str, Any]]] = {}
    for m in res["missing"]:
        by_ds.setdefault(m["dataset"], []).append(m)
    ran = {e["dataset"] for e in res.get("results", [])}
    parts = []
    for ds, ms in by_ds.items():
        runs = sum(int(m["runs"]) for m in ms)
        if ds not in ran and len(ms) > 1:
            parts.append(f"{ds}: all {len(ms)} variants ({runs} runs)")
        else:
            parts.append(f"{ds}: " + ", ".join(f"{m['variant']} ({m['runs']})" for m in ms))
    return "Planned but not run yet (no results file; runs in parentheses): " + "; ".join(parts) + "."


def markdown(res: dict[str, Any]) -> str:
    """A suite's table: one row per (dataset, variant), mean ± std over seeds, and its notes."""
    count = lambda d: ", ".join(f"{k} ({n})" for k, n in d.items()) or "-"  # noqa: E731
    lines = [
        f"### Suite `{res['suite']}`: {res['description']}",
        "",
        f"Aggregated at commit `{res['commit']}`, {res['time']}, "
        f"from runs of commits {count({short_hashes(c): n for c, n in res.get('run_commits', {}).items()})} "
        f"on {count(res.get('devices', {}))} (number of runs in parentheses; each run's folder names its own). "
        "Mean ± std over seeds; full ranking. "
        "Train s is wall time with several runs sharing a GPU, so it compares runs of one suite, not machines.",
        "",
    ]
    extra = beyond_columns(res["results"])
    lines.append(
        "| dataset | variant | protocol | seeds | valid NDCG@10 | test NDCG@10 | test HR@10 | test MRR |"
        + "".join(f" {BEYOND_COLUMNS[k]} |" for k in extra)
        + " params (non-emb.) | train s | GPU |"
    )
    lines.append("|---|---|---|---|---|---|---|---|" + "---|" * len(extra) + "---|---|---|")
    lines += [_table_row(e, extra) for e in res["results"]]
    return "\n".join(lines + _left_out(res)) + "\n"


def beyond_table(res: dict[str, Any]) -> str:
    """Accuracy beside diversity: test NDCG@10 and the beyond-accuracy columns of every row that
    has them, mean ± std over seeds (seeds in parentheses); "" when no row has them."""
    extra = beyond_columns(res["results"])
    rows = [e for e in res["results"] if any(k in e for k in extra)]
    if not rows:
        return ""
    lines = [
        "| dataset | variant | seeds | test NDCG@10 |" + "".join(f" {BEYOND_COLUMNS[k]} |" for k in extra),
        "|---|---|---|---|" + "---|" * len(extra),
    ]
    for e in rows:
        cells = "".join(f" {_beyond_cell(e, k)} |" for k in extra)
        lines.append(f"| {e['dataset']} | {e['variant']} | {e['seeds']} | {_mean_std(e, 'test/NDCG@10')} |{cells}")
    return "\n".join(lines) + "\n"


# more diverse = wider coverage, flatter counts (lower Gini), rarer items, more varied lists
DIVERSER = {"test/Coverage@10": 1, "test/Gini@10": -1, "test/Novelty@10": 1, "test/ILD@10": 1}


def _diversity_pairs(res: dict[str, Any]) -> list[tuple[str, str, int, int, list[tuple[str, float, float, str]]]]:
    """(dataset, other model, its seeds, Fuxi-MME's seeds, [(metric, difference, Welch t, reading)])
    for Fuxi-MME against FuXi-alpha and SASRec (base presets) on each dataset where the rows have
    the beyond-accuracy metrics; NDCG@10 first. Readings at 5%: "more diverse" / "less diverse" /
    "level" (for NDCG@10 "ahead" / "behind" / "level")."""
    cells = {(e["dataset"], e["variant"]): e for e in res["results"]}
    out = []
    for ds in dict.fromkeys(e["dataset"] for e in res["results"]):
        mme = cells.get((ds, "fuxi-mme"))
        if mme is None or "test/Coverage@10" not in mme:
            continue
        for other in ("fuxi-alpha", "sasrec"):
            o = cells.get((ds, other))
            if o is None or "test/Coverage@10" not in o:
                continue
            cols = []
            for key in ("test/NDCG@10", *BEYOND_COLUMNS):
                if key not in mme or key not in o:
                    continue
                if min(mme["seeds"], o["seeds"]) < 2:  # no spread to test against
                    cols.append((key.split("/")[1], mme[key]["mean"] - o[key]["mean"], float("nan"), "one seed: not tested"))
                    continue
                t, df = welch(mme[key], mme["seeds"], o[key], o["seeds"])
                word = reading(t, df)
                if key in DIVERSER and word != "level":
                    word = "more diverse" if (word == "ahead") == (DIVERSER[key] > 0) else "less diverse"
                cols.append((key.split("/")[1], mme[key]["mean"] - o[key]["mean"], t, word))
            out.append((ds, other, o["seeds"], mme["seeds"], cols))
    return out


def diversity_comparison(res: dict[str, Any]) -> str:
    """The table of :func:`_diversity_pairs`, one row per dataset and model; "" when there is none."""
    lines = []
    for ds, other, o_seeds, m_seeds, cols in _diversity_pairs(res):
        cells = [
            f"{name} {diff:+.{2 if 'Novelty' in name else 4}f} (" + (f"t {t:.1f}, " if t == t else "") + f"{word})" for name, diff, t, word in cols
        ]
        lines.append(f"| {ds} | {other} ({o_seeds}) | {m_seeds} | " + "; ".join(cells) + " |")
    if not lines:
        return ""
    head = ["| dataset | Fuxi-MME against (seeds) | Fuxi-MME seeds | difference, Welch t and reading at 5% |", "|---|---|---|---|"]
    return "\n".join(head + lines) + "\n"


def diversity_answer(res: dict[str, Any]) -> str:
    """The table's answer in words, one sentence per dataset and model: the accuracy reading, then
    on how many diversity measures Fuxi-MME reads more diverse, less diverse and level (named).
    Each measure is tested on its own at 5%, not corrected for there being several."""
    names = {"fuxi-alpha": "FuXi-alpha", "sasrec": "SASRec"}
    out = []
    for ds, other, o_seeds, m_seeds, cols in _diversity_pairs(res):
        if min(o_seeds, m_seeds) < 2:
            out.append(f"**{ds}**: against {names.get(other, other)}: one seed on a side, not tested.")
            continue
        acc = next((w for n, _, _, w in cols if n == "NDCG@10"), None)
        div = [(n.split("@")[0], w) for n, _, _, w in cols if n != "NDCG@10"]
        parts = []
        for word in ("more diverse", "less diverse", "level"):
            hit = [n for n, w in div if w == word]
            parts.append(f"{word} on {len(hit) if hit else 'none'}" + (f" ({', '.join(hit)})" if hit else ""))
        where = {"ahead": "ahead in accuracy", "behind": "behind in accuracy", "level": "level in accuracy"}.get(acc or "", "accuracy not compared")
        measures = f"{', '.join(parts[:2])} and {parts[2]}"
        out.append(f"**{ds}**: against {names.get(other, other)}, Fuxi-MME is {where} (NDCG@10); of {len(div)} diversity measures it is {measures}.")
    return "\n\n".join(out) + "\n" if out else ""


def headline(res: dict[str, Any], metric: str = "test/NDCG@10") -> str:
    """Datasets x models pivot of the main suite (loo-val, base sizes)."""
    cells = {(e["dataset"], e["variant"]): e for e in res["results"]}
    datasets = list(dict.fromkeys(e["dataset"] for e in res["results"]))
    lines = ["| dataset | " + " | ".join(HEADLINE_MODELS) + " |", "|---" * (len(HEADLINE_MODELS) + 1) + "|"]
    for ds in datasets:
        row = []
        best = max((cells[(ds, m)][metric]["mean"] for m in HEADLINE_MODELS if (ds, m) in cells and metric in cells[(ds, m)]), default=None)
        for m in HEADLINE_MODELS:
            e = cells.get((ds, m))
            if e is None or metric not in e:
                row.append("-")
                continue
            v = f"{e[metric]['mean']:.4f} ± {e[metric]['std']:.4f} ({e['seeds']}){_low_mark(e)}"
            row.append(f"**{v}**" if e[metric]["mean"] == best else v)
        label = ds + (" (not the published ML-1M)" if ds == "ml-1m-ts70" else "")
        lines.append(f"| {label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def cross_domain(res: dict[str, Any], suffix: str = "", metric: str = "test/NDCG@10") -> str:
    """Each model's rank among the headline models on every dataset (1 = best mean ``metric``),
    with the value, and its mean rank over the datasets: shipped defaults across domains.
    ``suffix``: " large" for the large presets' rows."""
    cells = {(e["dataset"], e["variant"]): e[metric]["mean"] for e in res["results"] if metric in e}
    marks = {(e["dataset"], e["variant"]): _low_mark(e) for e in res["results"]}
    datasets = [d for d in dict.fromkeys(e["dataset"] for e in res["results"]) if any((d, m + suffix) in cells for m in HEADLINE_MODELS)]
    models = [m for m in HEADLINE_MODELS if any((d, m + suffix) in cells for d in datasets)]
    if not models:
        return ""  # nothing of these rows ran (the large presets on own data, say)
    ranks: dict[tuple[str, str], int] = {}
    for d in datasets:
        present = sorted((m for m in models if (d, m + suffix) in cells), key=lambda m: -cells[(d, m + suffix)])
        ranks.update({(d, m): i + 1 for i, m in enumerate(present)})
    lines = ["| model | " + " | ".join(datasets) + " | mean rank |", "|---" * (len(datasets) + 2) + "|"]
    for m in models:
        row = [f"{ranks[(d, m)]} ({cells[(d, m + suffix)]:.4f}){marks[(d, m + suffix)]}" if (d, m) in ranks else "-" for d in datasets]
        mine = [ranks[(d, m)] for d in datasets if (d, m) in ranks]
        lines.append(f"| {m}{suffix} | " + " | ".join(row) + f" | {sum(mine) / len(mine):.1f} |")
    return "\n".join(lines) + "\n"


def main_spec(dataset: str, variant: str) -> tuple[str, str, str, tuple[str, ...]] | None:
    """(model, size, protocol, overrides) of a main-suite row, from the suite's own variant
    table (not its label); None for a row the main suite does not define."""
    main = SUITES["main"]
    v = main.variants_for(dataset).get(variant)
    return None if v is None else (v.model, v.size, main.protocol_of(v), v.sets)


def equal_size_comparison(res: dict[str, Any], metric: str = "test/NDCG@10") -> str:
    """Fuxi-MME against FuXi-alpha of the same size and protocol (equal embedding size) on every
    dataset of the main suite, with Welch's t over seeds and its reading at 5%."""
    cells: dict[tuple[str, str, str, str, tuple[str, ...]], dict[str, Any]] = {}
    for e in res["results"]:
        spec = main_spec(e["dataset"], e["variant"])
        if spec is not None and metric in e:
            cells[(e["dataset"], spec[0], spec[1], spec[2], spec[3])] = e
    lines = ["| dataset | size | protocol | FuXi-alpha | Fuxi-MME | difference | Welch t (df) | reading at 5% |", "|---|---|---|---|---|---|---|---|"]
    for (ds, model, size, protocol, over), mme in cells.items():
        alpha = cells.get((ds, "fuxi-alpha", size, protocol, over))
        if model != "fuxi-mme" or alpha is None:
            continue
        a, m = alpha[metric], mme[metric]
        t, df = welch(m, mme["seeds"], a, alpha["seeds"])
        size = ", ".join([size, *over])
        lines.append(
            f"| {ds} | {size} | {protocol} | {a['mean']:.4f} ± {a['std']:.4f} ({alpha['seeds']}) | "
            f"{m['mean']:.4f} ± {m['std']:.4f} ({mme['seeds']}) | "
            f"{m['mean'] - a['mean']:+.4f} | {t:.1f} ({df:.1f}) | {reading(t, df)} |"
        )
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""  # "": no dataset with both models


def published_comparison(res: dict[str, Any]) -> str:
    """Fuxi-MME (each size) against the best published Amazon figure: above it beyond seed noise
    when a one-sample t-test of our seeds against that constant rejects equality at 5%."""
    # (dataset, model, size) -> (label, entry) of the plain loo-val rows (no extra overrides)
    cells: dict[tuple[str, str, str], tuple[str, dict[str, Any]]] = {}
    for e in res["results"]:
        spec = main_spec(e["dataset"], e["variant"])
        if spec is not None and spec[2:] == ("loo-val", ()) and "test/NDCG@10" in e:
            cells[(e["dataset"], spec[0], spec[1])] = (e["variant"], e)
    lines = [
        "| dataset | published SASRec+SS / HSTU / FuXi-alpha (quoted) | size | our fuxi-mme | our best model of that size | target met |",
        "|---|---|---|---|---|---|",
    ]
    for ds, pub in PUBLISHED_AMAZON.items():
        for size in ("base", "large"):
            if (ds, "fuxi-mme", size) not in cells:
                continue
            mine = cells[(ds, "fuxi-mme", size)][1]
            ours = {label: e["test/NDCG@10"]["mean"] for (d, _, z), (label, e) in cells.items() if d == ds and z == size}
            best = max(ours, key=lambda label: ours[label])
            m, top, n = mine["test/NDCG@10"], max(pub.values()), mine["seeds"]
            # one-sample t against the quoted constant: Welch's t with a spread-free second side
            t, df = welch(m, n, {"mean": top, "std": 0.0}, 1)
            met = "yes, beyond seed noise" if n > 1 and reading(t, df) == "ahead" else "above, within seed noise" if m["mean"] > top else "no"
            quoted = " / ".join(f"{v:.4f}" for v in pub.values())
            lines.append(f"| {ds} | {quoted} | {size} | {m['mean']:.4f} ± {m['std']:.4f} | {best} {ours[best]:.4f} | {met} |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""  # "": none of the Amazon sets ran


def _welch_cells(first: dict[str, Any], second: dict[str, Any], metric: str) -> str:
    """The "Welch t (df) | reading at 5%" cells of first - second, or "- | one seed: not tested"
    when a side has no spread to test against."""
    if min(first["seeds"], second["seeds"]) < 2:
        return "- | one seed: not tested"
    t, df = welch(first[metric], first["seeds"], second[metric], second["seeds"])
    return f"{t:.1f} ({df:.1f}) | {reading(t, df)}"


def _behaviour_pairs(res: dict[str, Any], metric: str) -> Iterator[tuple[str, str, str, dict[str, Any], dict[str, Any]]]:
    """(dataset, model, target, plain row, behaviour-aware row) of every pair whose two rows have
    ``metric``, in the table's order."""
    cells = {(e["dataset"], e["variant"]): e for e in res["results"] if metric in e}
    for ds in dict.fromkeys(e["dataset"] for e in res["results"]):
        for model in ("fuxi-alpha", "fuxi-mme"):
            for target in ("next", "next target"):
                plain, aware = cells.get((ds, f"{model} {target}")), cells.get((ds, f"{model}+behaviour {target}"))
                if plain is not None and aware is not None:
                    yield ds, model, target, plain, aware


def behaviour_comparison(res: dict[str, Any], metric: str = "test/NDCG@10") -> str:
    """The ``behavior`` suite's answer: each model with behaviours as input against the same model
    without, for the next item and for the next target-behaviour item, on every dataset, with
    Welch's t over seeds and its reading at 5%; "" when no pair has finished."""
    lines = []
    for ds, model, target, plain, aware in _behaviour_pairs(res, metric):
        p, a = plain[metric], aware[metric]
        lines.append(
            f"| {ds} | {model} | {target} | {p['mean']:.4f} ± {p['std']:.4f} ({plain['seeds']}) | "
            f"{a['mean']:.4f} ± {a['std']:.4f} ({aware['seeds']}) | {a['mean'] - p['mean']:+.4f} | {_welch_cells(aware, plain, metric)} |"
        )
    if not lines:
        return ""
    head = [
        "| dataset | model | target | plain | with behaviours | difference | Welch t (df) | reading at 5% |",
        "|---|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + lines) + "\n"


def behaviour_answer(res: dict[str, Any], metric: str = "test/NDCG@10") -> str:
    """:func:`behaviour_comparison` in words, one sentence per dataset: how many of its pairs read
    ahead, behind and level at 5%, and in how many the behaviour-aware mean is the higher."""
    tested: dict[str, list[tuple[str, bool]]] = {}  # dataset -> (reading, aware mean higher) per pair
    for ds, _, _, plain, aware in _behaviour_pairs(res, metric):
        if min(plain["seeds"], aware["seeds"]) >= 2:
            word = reading(*welch(aware[metric], aware["seeds"], plain[metric], plain["seeds"]))
            tested.setdefault(ds, []).append((word, aware[metric]["mean"] > plain[metric]["mean"]))
    out = []
    for ds, pairs in tested.items():
        n, higher = len(pairs), sum(h for _, h in pairs)
        ahead, behind = sum(w == "ahead" for w, _ in pairs), sum(w == "behind" for w, _ in pairs)
        if ahead and behind:
            gist = "mixed"
        elif ahead:
            gist = "they help" if ahead == n else "a gain in some pairs, a loss in none"
        elif behind:
            gist = "they hurt" if behind == n else "a loss in some pairs, a gain in none"
        else:
            gist = "no difference beyond seed noise"
        out.append(
            f"**{ds}**: with behaviours as input, ahead in {ahead}, behind in {behind} and level in {n - ahead - behind} "
            f"of the {n} {'pair' if n == 1 else 'pairs'} with at least 2 seeds a side: {gist}; the behaviour-aware mean "
            f"is the higher in {higher} of {n}."
        )
    return "\n\n".join(out) + "\n" if out else ""


def versus_table(res: dict[str, Any], pairs: list[tuple[str, str]], metric: str = "test/NDCG@10", seconds: bool = True) -> str:
    """Row ``b`` against row ``a`` of the same dataset, for each ``(a, b)`` variant pair and every
    dataset where both have ``metric``: both means, the difference (b - a), Welch's t over seeds
    and its reading at 5% ("ahead" = b above a); with ``seconds``, the mean training seconds of
    each side (meaningful only when both ran on one machine, as in one suite's run). "" when no
    pair has finished."""
    cells = {(e["dataset"], e["variant"]): e for e in res["results"] if metric in e}
    lines = []
    for ds in dict.fromkeys(e["dataset"] for e in res["results"]):
        for a_name, b_name in pairs:
            a, b = cells.get((ds, a_name)), cells.get((ds, b_name))
            if a is None or b is None:
                continue
            test = _welch_cells(b, a, metric)
            secs = " / ".join(f"{e['train_seconds']['mean']:.0f}" if e.get("train_seconds") else "-" for e in (a, b))
            lines.append(
                f"| {ds} | {b_name} against {a_name} | {a[metric]['mean']:.4f} ± {a[metric]['std']:.4f} ({a['seeds']}) | "
                f"{b[metric]['mean']:.4f} ± {b[metric]['std']:.4f} ({b['seeds']}) | {b[metric]['mean'] - a[metric]['mean']:+.4f} | {test} |"
                + (f" {secs} |" if seconds else "")
            )
    if not lines:
        return ""
    head = [
        f"| dataset | pair | first: {metric} | second: {metric} | difference | Welch t (df) | reading at 5% |"
        + (" train s (first / second) |" if seconds else ""),
        "|---|---|---|---|---|---|---|" + ("---|" if seconds else ""),
    ]
    return "\n".join(head + lines) + "\n"

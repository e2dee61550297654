"""The results page's tuning section: ``fuxi-mme tune`` studies kept under ``<root>/tune/<study>/``
(their ``results.json``, ``best.yaml``, ``trials.jsonl`` and the winner's ``best-run.json``), set
beside the main suite's rows for the same model and dataset, so a tuned model and its shipped
preset are read together and every model tuned with the same budget is listed beside it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PROSE = [
    "### Tuning",
    "",
    "`fuxi-mme tune --dataset DATASET --model MODEL --trials N` (docs/training.md#tuning): the model family's default",
    "search space, selection on validation NDCG@10 only, pruning of trials whose validation curve falls below the",
    "median of finished trials at the same epoch; trial 0 is the shipped base preset itself (seed 42); the test split is",
    "evaluated once, for the winner alone. Wall time is the study's, across its invocations, on the GPU named, with",
    "several trials (and the other model's study) sharing it; trial-seconds add every trial's own time. The main suite's",
    "rows are the shipped presets, mean ± std over seeds, for reference: the tuned test figure is one seed.",
    "",
]


def load_studies(tune_root: Path) -> list[dict[str, Any]]:
    """Every study folder under ``tune_root`` with a ``results.json``, by dataset then model."""
    studies = []
    for f in sorted(tune_root.glob("*/results.json")):
        res = json.loads(f.read_text())
        run = f.parent / "best-run.json"
        res["_run"] = json.loads(run.read_text()) if run.exists() else {}
        res["_folder"] = f.parent.name
        res["_trial_seconds"] = sum(t.get("seconds") or 0.0 for t in res["trials"])
        studies.append(res)
    return sorted(studies, key=lambda r: (r["dataset"], r["model"]))


def _state_counts(res: dict[str, Any]) -> str:
    states = [t["state"] for t in res["trials"]]
    return f"{len(states)} ({states.count('complete')} / {states.count('pruned')})"


def _main_cell(main: dict[tuple[str, str], dict[str, Any]], dataset: str, variant: str) -> str:
    e = main.get((dataset, variant))
    if e is None or "valid_best/NDCG@10" not in e or "test/NDCG@10" not in e:
        return "-"
    return f"{e['valid_best/NDCG@10']['mean']:.4f} / {e['test/NDCG@10']['mean']:.4f} ± {e['test/NDCG@10']['std']:.4f} ({e['seeds']})"


def _value(t: dict[str, Any]) -> str:
    """A trial's validation NDCG@10, or "-" while it has none (running, failed, not started)."""
    v = t.get("value")
    return "-" if v is None else f"{v:.4f}"


def _params(params: dict[str, Any]) -> str:
    out = []
    for k, v in params.items():
        name = k.split(".")[-1]
        out.append(f"{name} {v:.3g}" if isinstance(v, float) else f"{name} {v}")
    return ", ".join(out)


def tuning_table(studies: list[dict[str, Any]], main: dict[str, Any] | None) -> str:
    """One row per study: budget, wall time, the preset's and the winner's validation NDCG@10, the
    winner's test figures, and the main suite's base and large rows of the same model and dataset."""
    cells = {(e["dataset"], e["variant"]): e for e in (main or {}).get("results", []) if e.get("protocol") == "loo-val"}
    lines = [
        "| dataset | model | trials (complete / pruned) | wall s | trial s | GPU | valid: preset (trial 0) | valid: winner | "
        "test NDCG@10 / HR@10: winner | main suite base: valid / test | main suite large: valid / test |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    notes = []
    for r in studies:
        best, base, test = r.get("best") or {}, r.get("baseline") or {}, r.get("test") or {}
        gpu = (r["_run"].get("device") or {}).get("gpu") or (r["_run"].get("device") or {}).get("device", "-")
        tested = f"{test['NDCG@10']:.4f} / {test['HR@10']:.4f}" if "NDCG@10" in test else "not tested"
        winner = f"{_value(best)} (trial {best['number']})" if best.get("value") is not None else "-"
        lines.append(
            f"| {r['dataset']} | {r['model']} | {_state_counts(r)} | {r.get('wall_seconds', 0):.0f} | {r['_trial_seconds']:.0f} | {gpu} | "
            f"{_value(base)} | {winner} | {tested} | "
            f"{_main_cell(cells, r['dataset'], r['model'])} | {_main_cell(cells, r['dataset'], r['model'] + ' large')} |"
        )
        if best.get("value") is not None:
            against = (
                f"{best['value'] - base['value']:+.4f} valid NDCG@10 against its preset's trial 0"
                if base.get("value") is not None
                else "(its preset's trial 0 has no value yet)"
            )
            notes.append(
                f"- {r['model']} on {r['dataset']}: the winner (trial {best['number']}: {_params(best['params'])}) is "
                f"{against}; folder `results/tune/{r['_folder']}/` "
                f"(`best.yaml` trains it: `fuxi-mme train --config results/tune/{r['_folder']}/best.yaml --source FILE`)."
            )
    for ds in dict.fromkeys(r["dataset"] for r in studies):
        ranked = sorted((r for r in studies if r["dataset"] == ds and "NDCG@10" in (r.get("test") or {})), key=lambda r: -r["test"]["NDCG@10"])
        if len(ranked) > 1:
            order = ", ".join(f"{r['model']} {r['test']['NDCG@10']:.4f} (valid {r['best']['value']:.4f}, {len(r['trials'])} trials)" for r in ranked)
            same = len({len(r["trials"]) for r in ranked}) == 1
            notes.append(f"- {'Same budget' if same else 'Unequal budgets'} on {ds}, winners' test NDCG@10, best first: {order}; one seed each.")
    return "\n".join([*lines, "", *notes]) + "\n"


def tuning_section(root: Path, main: dict[str, Any] | None) -> list[str]:
    """The section's lines, or none when no study is kept under ``root/tune``."""
    studies = load_studies(root / "tune")
    if not studies:
        return []
    return [*PROSE, tuning_table(studies, main), ""]

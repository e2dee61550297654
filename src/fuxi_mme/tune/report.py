"""The study's results page (``results.md``): the winner, the base config, every trial."""

from __future__ import annotations

from typing import Any


def _value(t: dict[str, Any] | None) -> str:
    return "-" if not t or t.get("value") is None else f"{t['value']:.4f}"


def _param(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def render(res: dict[str, Any]) -> str:
    trials = res["trials"]
    states = {s: sum(t["state"] == s for t in trials) for s in ("complete", "pruned", "failed", "running")}
    seconds = sum(t.get("seconds") or 0 for t in trials)
    lines = [
        f"# Tuning {res['model']} on {res['dataset']}",
        "",
        f"Selection on the validation split ({res['metric']}), {res['sampler']} sampler (seed {res['seed']}), "
        f"pruning {'on (median rule)' if res['prune'] else 'off'}. Trials: {len(trials)} "
        f"({', '.join(f'{n} {s}' for s, n in states.items() if n)}), {seconds:,.0f} trial-seconds in all, "
        f"{res.get('wall_seconds', 0):,.0f} s wall time.",
        "",
    ]
    best, base = res.get("best"), res.get("baseline")
    if best:
        epoch = best.get("epoch")
        lines.append(f"**Best**: trial {best['number']}, valid {_value(best)} (epoch {epoch}); the base config (trial 0): {_value(base)}.")
    test = res.get("test")
    if test:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in test.items() if "@" in k or k == "MRR")
        lines.append(f"**Test** (evaluated once, for the best trial alone): {shown}.")
    lines += ["", "Search space:", ""]
    lines += [f"- `{name}`: {desc}" for name, desc in res["space"].items()]
    names = list(res["space"])
    lines += [
        "",
        "| trial | state | valid | epoch | seconds | " + " | ".join(n.split(".")[-1] for n in names) + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    order = sorted(trials, key=lambda t: (t.get("value") is None, -(t.get("value") or 0.0), t["number"]))
    for t in order:
        cells = [str(t["number"]), t["state"], _value(t), str(t.get("epoch") or "-"), f"{t['seconds']:.0f}" if t.get("seconds") else "-"]
        cells += [_param(t["params"].get(n, "-")) for n in names]
        lines.append("| " + " | ".join(cells) + " |")
    failed = [t for t in trials if t["state"] == "failed" and t.get("error")]
    if failed:
        lines += ["", "Failed trials:", ""] + [f"- {t['number']}: {t['error']}" for t in failed]
    return "\n".join(lines) + "\n"

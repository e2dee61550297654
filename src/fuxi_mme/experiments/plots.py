"""The scaling suite's plot: test NDCG@10 against depth, experts and parameters (matplotlib)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

# The series: a variant name before its " L=" / " E=", labelled for the legend.
SERIES_LABELS = {"fuxi-mme": "fuxi-mme (first defaults)", "fuxi-mme shipped": "fuxi-mme (ML-1M preset decoder)"}
SWEEPS = (("L=", "layers"), ("E=", "experts"))


def series_of(variant: str, key: str) -> str:
    """``fuxi-mme shipped L=4`` -> ``fuxi-mme shipped`` (key ``L=``)."""
    return variant.split(key)[0].strip()


def _families(rows: list[dict[str, Any]], key: str) -> list[str]:
    return sorted({series_of(e["variant"], key) for e in rows if key in e["variant"]})


def _sweep_panel(ax: Any, rows: list[dict[str, Any]], key: str, label: str) -> None:
    """One series per family: test NDCG@10 (± std) against the swept value, points labelled
    with non-embedding parameters and training seconds."""
    for fam in _families(rows, key):
        pts = sorted((int(e["variant"].split(key)[1]), e) for e in rows if key in e["variant"] and series_of(e["variant"], key) == fam)
        xs = [x for x, _ in pts]
        ys = [e["test/NDCG@10"]["mean"] for _, e in pts]
        err = [e["test/NDCG@10"]["std"] for _, e in pts]
        ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=SERIES_LABELS.get(fam, fam))
        for x, (_, e) in zip(xs, pts):
            p = e.get("parameters", {}).get("non_embedding")
            t = e.get("train_seconds", {}).get("mean")
            if p is not None:
                text = f"{p / 1e3:.0f}k p" + (f", {t:.0f}s" if t else "")
                ax.annotate(text, (x, e["test/NDCG@10"]["mean"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log", base=2)
    ax.set(xlabel=label, ylabel="test NDCG@10", title=f"{rows[0]['dataset']}: test NDCG@10 vs {label}\n(points: non-embedding params, train s)")


def _cost_panel(ax: Any, rows: list[dict[str, Any]]) -> None:
    """Every variant against its non-embedding parameters, one series per sweep."""
    import matplotlib.ticker

    for key, label in SWEEPS:
        for fam in _families(rows, key):
            pts = sorted(
                (e["parameters"]["non_embedding"], e["test/NDCG@10"]["mean"])
                for e in rows
                if key in e["variant"] and series_of(e["variant"], key) == fam and e.get("parameters")
            )
            if pts:
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=f"{SERIES_LABELS.get(fam, fam)}, {label}")
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # the 2x10^4.. labels overlap
    ax.set(xlabel="non-embedding parameters", ylabel="test NDCG@10", title=f"{rows[0]['dataset']}: test NDCG@10 vs parameters")


def plot_scaling(res: dict[str, Any], out: Path) -> Path | None:
    """Write the scaling plot to ``out`` (PNG); None without matplotlib or rows to draw."""
    plt = pyplot()
    if plt is None:
        return None
    rows = [e for e in res["results"] if "test/NDCG@10" in e]
    if not rows:
        return None
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.4))
    for ax, (key, label) in zip(axes, SWEEPS):
        _sweep_panel(ax, rows, key, label)
    _cost_panel(axes[2], rows)
    return save_figure(fig, axes, out)


def pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend, or None when matplotlib is not installed
    (the plots are an optional extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig: Any, axes: Any, out: Path) -> Path:
    """Grid and legends on every panel, then the PNG written to ``out`` atomically (a temporary
    file renamed over it); the figure is closed."""
    import matplotlib.pyplot as plt

    for ax in getattr(axes, "flat", axes):
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[1]:  # a legend only where something is labelled
            ax.legend(fontsize=8)
    tmp = out.with_name(f".{out.name}.tmp.png")
    try:
        fig.tight_layout()
        fig.savefig(tmp, dpi=110)
        tmp.replace(out)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)  # left only when writing failed
    return out

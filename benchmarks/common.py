"""What every benchmark script shares: the card name in file names, and writing a results
JSON with its Markdown table next to it (both atomically)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
if str(ROOT / "src") not in sys.path:
    sys.path.insert(0, str(ROOT / "src"))

from fuxi_mme.utils.runinfo import atomic_write_json, atomic_write_text  # noqa: E402


def card(info: dict) -> str:
    """The GPU's name (or "cpu") as it appears in results file names."""
    return (info["device"].get("gpu") or "cpu").replace(" ", "_")


def save(out: Path, payload: dict, md_lines: list[str]) -> Path:
    """``out``.json and ``out``.md (any suffix of ``out`` is replaced); returns the .md path."""
    atomic_write_json(out.with_suffix(".json"), payload)
    atomic_write_text(out.with_suffix(".md"), "\n".join(md_lines) + "\n")
    return out.with_suffix(".md")

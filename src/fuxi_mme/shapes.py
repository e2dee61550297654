"""Data shapes: the defaults a dataset gets, chosen from what its data looks like.

A *shape* holds the data and training settings (sequence length, epochs, dropout, loss) and
names the size tables and Fuxi-MME decoder (``presets.py``) that the validation suites chose
for data of that kind. Named datasets map to a shape here; a user's own data is measured
(:func:`choose_shape`) and gets the shape whose evidence it resembles. The rules and the
evidence behind their thresholds: docs/datasets.md#defaults-by-shape.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Shape:
    name: str
    about: str  # one line: what data this shape is for
    dims: str  # key of the size tables in presets.py
    max_len: int
    epochs: int
    dropout: float = 0.2
    patience: int | None = 10
    loss: str = "sampled"  # train.loss; "full" where the validation split chose it (docs/models.md)
    mme: str | None = None  # key of presets.MME_DECODERS; None: the dims group's (a key not there: the first defaults)


SHAPES: dict[str, Shape] = {
    s.name: s
    for s in [
        Shape(
            "short",
            "short histories over a large catalogue (Amazon-like: median length under 20)",
            "amazon",
            max_len=50,
            epochs=200,
            dropout=0.5,
            loss="full",
        ),
        Shape("long", "long histories (MovieLens-1M-like)", "ml-1m", max_len=200, epochs=101),
        # ML-100K overfits the ML-1M group's wider Fuxi-MME decoder (validation, docs/models.md)
        Shape(
            "long-few-users", "long histories of few users (MovieLens-100K-like: under 2,500 users)", "ml-1m", max_len=200, epochs=101, mme="first"
        ),
        Shape("long-large", "long histories, many interactions (MovieLens-20M-like: 5 million or more)", "ml-20m", max_len=200, epochs=101),
        Shape("demo", "the built-in demo log", "demo", max_len=50, epochs=15, patience=5),
    ]
}


@dataclass(frozen=True)
class DatasetDefaults:
    shape: str
    overrides: dict[str, Any] = field(default_factory=dict)  # data settings of this dataset alone


# Named datasets and their shapes. "file" (own data under the old generic name) keeps the shape it
# always had; own data under any other name is measured.
DATASETS: dict[str, DatasetDefaults] = {
    "demo": DatasetDefaults("demo"),
    "ml-100k": DatasetDefaults("long-few-users"),
    "ml-1m": DatasetDefaults("long"),
    "ml-1m-ts70": DatasetDefaults("long"),
    "ml-20m": DatasetDefaults("long-large"),
    "amazon-beauty": DatasetDefaults("short"),
    "amazon-sports": DatasetDefaults("short"),
    "amazon-toys": DatasetDefaults("short"),
    # KuaiRand: FuXi-alpha's shape for it is not fully published; the ML-1M widths and HSTU's
    # long-sequence length are our choice (docs/datasets.md).
    "kuairand-pure": DatasetDefaults("long", {"max_len": 256}),
    "kuairand-1k": DatasetDefaults("long", {"max_len": 256}),
    "file": DatasetDefaults("long"),
}

# Thresholds of choose_shape, each between the datasets whose suites chose the shapes
# (docs/datasets.md#defaults-by-shape): median history length 6 on Amazon Beauty, Sports and
# Toys against 65-96 on MovieLens-100K and -1M; 943 users (ML-100K) against 6,040 (ML-1M);
# 1.0 million interactions (ML-1M) against 20 million (ML-20M).
SHORT_MEDIAN_LENGTH = 20
FEW_USERS = 2_500
MANY_INTERACTIONS = 5_000_000


def choose_shape(stats: dict[str, Any]) -> tuple[str, str]:
    """The shape for a prepared dataset's statistics (``PreparedDataset.stats``), and why."""
    median = float(stats["seq_len_percentiles"]["50"])
    users, inter = int(stats["users"]), int(stats["interactions"])
    ts = "with timestamps" if stats.get("has_timestamps") else "no timestamps (temporal channel off)"
    seen = f"median history {median:g} events, {users:,} users, {int(stats['items']):,} items, {inter:,} interactions, {ts}"
    if median < SHORT_MEDIAN_LENGTH:
        return "short", f"{seen}: median history under {SHORT_MEDIAN_LENGTH} -> short (Amazon-like)"
    if users < FEW_USERS:
        return "long-few-users", f"{seen}: long histories, under {FEW_USERS:,} users -> long-few-users (MovieLens-100K-like)"
    if inter >= MANY_INTERACTIONS:
        return "long-large", f"{seen}: long histories, {MANY_INTERACTIONS:,} interactions or more -> long-large (MovieLens-20M-like)"
    return "long", f"{seen}: long histories -> long (MovieLens-1M-like)"

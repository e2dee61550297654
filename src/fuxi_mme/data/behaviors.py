"""Behaviours: an event type per interaction (docs/datasets.md#behaviours).

``data.behavior`` picks where they come from: ``auto`` (the source's own ``behavior`` column:
the demo, OTTO sessions, KuaiRand's folded flags), ``rating`` (star buckets ``1-2``, ``3``,
``4-5``; ratings between are rounded) or a column of a table file. Prepared datasets store
them as small integer codes per event: 0 is padding, 1..B the names in ``behavior_names``.

``data.target_behavior`` makes the next-item loss and the leave-one-out targets range over the
events of one behaviour; the history keeps every event (:func:`target_points`).
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd

from .table import DataError, plain

log = logging.getLogger(__name__)

MAX_BEHAVIORS = 15  # names per dataset; codes 1..15 fit the models' 16-row table (row 0: none)
RATING_BUCKETS = ("1-2", "3", "4-5")


def rating_buckets(rating: np.ndarray) -> np.ndarray:
    """Star ratings -> "1-2", "3" or "4-5" (half stars are rounded to the nearer star)."""
    r = np.rint(np.asarray(rating, dtype=np.float64))
    return np.where(r <= 2, RATING_BUCKETS[0], np.where(r >= 4, RATING_BUCKETS[2], RATING_BUCKETS[1])).astype(object)


def attach_behavior(df: pd.DataFrame, spec: str | None, source: str) -> pd.DataFrame:
    """The canonical table with a string ``behavior`` column as ``data.behavior`` asks (``None``:
    without one, so the prepared dataset is exactly the one without behaviours)."""
    if spec is None:
        return df.drop(columns=["behavior"]) if "behavior" in df.columns else df
    df = df.copy()
    if spec == "rating":
        if "rating" not in df.columns:
            raise DataError(f"{source}: data.behavior=rating but the data has no rating column; set data.rating_col or pick another data.behavior")
        df["behavior"] = rating_buckets(df["rating"].to_numpy())
    elif spec == "auto":
        if "behavior" not in df.columns:
            raise DataError(
                f"{source} has no behaviour column of its own; use data.behavior=rating (star buckets) or a column name, or leave it unset"
            )
    else:
        if spec not in df.columns:
            raise DataError(
                f"{source} has no column {spec!r} for data.behavior (columns: {', '.join(map(str, df.columns))}); "
                "name a kept column, or use auto or rating"
            )
        df["behavior"] = df[spec]
    col = df["behavior"]
    missing = (col.isna() | (col.astype(str).str.strip() == "")).to_numpy()
    if missing.any():
        i = int(np.flatnonzero(missing)[0])
        raise DataError(
            f"{source}: {int(missing.sum()):,} event(s) have no behaviour, first at data row {i + 1} (user {plain(df['user'].iloc[i])}, "
            f"item {plain(df['item'].iloc[i])}); fill them in or drop those rows"
        )
    df["behavior"] = col.astype(str).str.strip()
    return df


def encode(col: pd.Series, source: str) -> tuple[np.ndarray, list[str]]:
    """String behaviours -> (codes int8 in 1..B, names); rating buckets keep their star order."""
    values = col.to_numpy(dtype=object)
    found = set(values.tolist())
    names = [b for b in RATING_BUCKETS if b in found] if found <= set(RATING_BUCKETS) else sorted(found)
    if len(names) > MAX_BEHAVIORS:
        raise DataError(
            f"{source}: {len(names)} distinct behaviours ({', '.join(names[:8])}, ...); at most {MAX_BEHAVIORS} are supported: "
            "fold them into fewer types"
        )
    lookup = {n: i + 1 for i, n in enumerate(names)}
    return np.array([lookup[v] for v in values], dtype=np.int8), names


def behavior_code(names: list[str] | None, name: str, what: str = "data.target_behavior") -> int:
    """The code of behaviour ``name``; a one-line error listing the known names otherwise."""
    if not names:
        raise DataError(f"{what}={name!r} but the dataset has no behaviours; set data.behavior (auto, rating or a column)")
    if name not in names:
        raise DataError(f"{what}={name!r} is not a behaviour of this dataset; known: {', '.join(names)}")
    return names.index(name) + 1


def target_points(offsets: np.ndarray, behaviors: np.ndarray, code: int, names: list[str], protocol: str, dataset: str) -> dict[str, np.ndarray]:
    """Split points when targets are the events of behaviour ``code``: per user, test = the last
    such event, validation (loo-val) = the one before; training ends at the first held-out
    target, so nothing after the validation target trains. Users with too few target events
    are trained on fully and have no evaluation target (index -1)."""
    need = 2 if protocol == "loo-val" else 1
    U = len(offsets) - 1
    hit = np.flatnonzero(behaviors == code)
    user_of = np.searchsorted(offsets, hit, side="right") - 1
    counts = np.bincount(user_of, minlength=U)
    if not (counts >= need).any():
        per = np.bincount(behaviors.astype(np.int64), minlength=len(names) + 1)[1:]
        shown = ", ".join(f"{n} {c:,}" for n, c in zip(names, per))
        raise DataError(
            f"{dataset}: no user has {need} {names[code - 1]!r} event(s), which protocol {protocol!r} needs as targets "
            f"(events per behaviour: {shown}); pick another data.target_behavior or protocol"
        )
    last = np.full(U, -1, dtype=np.int64)
    prev = np.full(U, -1, dtype=np.int64)
    last_pos = np.cumsum(counts) - 1  # position in ``hit`` of each user's last target event
    has1, has2 = counts >= 1, counts >= 2
    last[has1] = hit[last_pos[has1]]
    prev[has2] = hit[last_pos[has2] - 1]
    ends = offsets[1:].copy()
    dropped = int((counts < need).sum())
    if dropped:
        log.info("%s: %d of %d users have fewer than %d %r events and are not evaluated", dataset, dropped, U, need, names[code - 1])
    if protocol == "paper":
        return {"train_end": np.where(has1, last, ends), "test": last}
    if protocol == "loo-val":
        return {"train_end": np.where(has2, prev, ends), "valid": np.where(has2, prev, -1), "test": np.where(has2, last, -1)}
    raise ValueError(f"unknown protocol {protocol!r}; use 'loo-val' or 'paper'")

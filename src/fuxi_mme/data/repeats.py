"""Repeat consumption: events whose item occurred earlier in the same user's sequence.

* :func:`repeat_flags` marks them on a prepared dataset (one bool per event);
* :func:`repeat_summary` gives the rates ``data info`` prints and evaluation's ``auto`` rule
  reads (docs/training.md#history-masking);
* :func:`apply_repeats` is ``data.repeats``: keep them, drop consecutive repeats, or keep only
  each user's first event per item, applied before the splits.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from .prepared import PreparedDataset, order_interactions, range_blocks

REPEAT_POLICIES = ("keep", "drop-consecutive", "first")


def repeat_flags(ds: PreparedDataset) -> np.ndarray:
    """(events,) bool: the event's item occurred earlier in the same user's sequence.

    An event's flag depends only on the events before it, so the flags of a prefix (the
    training part of each sequence) are the flags of the whole sequence restricted to it.
    Computed once per dataset object and kept on it."""
    cached = ds.__dict__.get("_repeat_flags")
    if cached is not None and len(cached) == len(ds.items):
        return cached
    user = np.repeat(np.arange(ds.num_users, dtype=np.int64), np.diff(ds.offsets))
    key = user * (ds.num_items + 1) + ds.items
    _, first = np.unique(key, return_index=True)  # index of each (user, item)'s first event
    flags = np.ones(len(key), dtype=bool)
    flags[first] = False
    ds.__dict__["_repeat_flags"] = flags
    return flags


def repeat_summary(ds: PreparedDataset, protocol: str) -> dict[str, float | int]:
    """Repeat rates of the whole data and of the training part, and how many evaluation
    targets of each split are repeats (counts of targets with at least one history item)."""
    from .splits import split_points

    flags = repeat_flags(ds)
    pts = split_points(ds, protocol)
    start = ds.offsets[:-1]
    n_train = rep_train = 0
    for idx in range_blocks(start, pts["train_end"]):  # pieces of users: large logs
        n_train += len(idx)
        rep_train += int(np.count_nonzero(flags[idx]))
    out: dict[str, float | int] = {
        "repeat_rate": float(np.count_nonzero(flags) / len(flags)) if len(flags) else 0.0,
        "train_repeat_rate": rep_train / n_train if n_train else 0.0,
    }
    for split in ("valid", "test"):
        if split in pts:
            tgt = pts[split][pts[split] - start >= 1]
            out[f"{split}_targets"] = int(len(tgt))
            out[f"{split}_repeat_targets"] = int(flags[tgt].sum())
    return out


def apply_repeats(df: pd.DataFrame, policy: str, ordering: str) -> tuple[pd.DataFrame, list[str]]:
    """``data.repeats`` on the canonical table (columns user, item, timestamp): ``keep`` returns
    it unchanged; ``drop-consecutive`` drops an event whose item equals the user's previous
    event's; ``first`` keeps only each user's first event of each item. The table is put in
    sequence order (``data.ordering``) first, so "previous" and "first" mean what the model sees."""
    if policy == "keep":
        return df, []
    if policy not in REPEAT_POLICIES:
        raise ValueError(f"data.repeats={policy!r} is not one of {', '.join(REPEAT_POLICIES)}")
    df = order_interactions(df.reset_index(drop=True), ordering)
    if policy == "drop-consecutive":
        same_user = df["user"].eq(df["user"].shift())
        drop = (same_user & df["item"].eq(df["item"].shift())).to_numpy()
    else:
        drop = df.duplicated(["user", "item"], keep="first").to_numpy()
    n = int(drop.sum())
    what = "consecutive repeat" if policy == "drop-consecutive" else "repeat (not the user's first of its item)"
    return df[~drop].reset_index(drop=True), ([f"data.repeats={policy}: dropped {n:,} {what} event(s)"] if n else [])

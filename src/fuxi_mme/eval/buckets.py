"""Metrics per user-history-length bucket (docs/training.md#history-length-buckets).

A user's history length is the number of its events before the evaluated target (the whole
history, not only the last ``data.max_len`` the model sees): ``short`` below 10, ``medium`` 10
to 49, ``long`` 50 or more. Each bucket holds its user count and the metrics of its users, so
the user-weighted mean of the buckets' metrics is the split's (tested).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from .metrics import metrics_from_ranks

BUCKET_EDGES = (10, 50)  # short < 10 <= medium < 50 <= long
BUCKET_NAMES = ("short", "medium", "long")


def history_buckets(lengths: np.ndarray) -> np.ndarray:
    """(U,) history lengths -> (U,) bucket index into :data:`BUCKET_NAMES`."""
    return np.searchsorted(np.asarray(BUCKET_EDGES), np.asarray(lengths), side="right")


def bucket_metrics(ranks: np.ndarray, lengths: np.ndarray, ks: tuple[int, ...]) -> dict[str, Any]:
    """``{bucket: {"users": n, HR@K, NDCG@K, MRR}}`` for the non-empty buckets."""
    which = history_buckets(lengths)
    out: dict[str, Any] = {}
    for i, name in enumerate(BUCKET_NAMES):
        sel = which == i
        if sel.any():
            out[name] = {"users": int(sel.sum()), **metrics_from_ranks(ranks[sel], ks)}
    return out

"""Pass 4 of the columnar preparation (``data/columnar.py``) for one partition. It lives outside
``fuxi_mme.data`` so that the worker processes the pass is spread over import NumPy alone (the
data package imports torch: about 0.3 GB and a second and a half per worker)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np


def sort_partition(
    parts_dir: str, p: int, lo: int, hi: int, n_items: int, has_time: bool, duplicates: str, min_user_interactions: int
) -> dict[str, Any]:
    """Pass 4 for partition ``p`` (user codes ``lo`` .. ``hi``-1): sort by (user, time) with file
    order breaking ties, drop exact duplicates (or report the first), drop short users, flag
    repeats; writes ``<p>.items``, ``<p>.timestamps``, ``<p>.repeats`` beside its inputs and
    returns the partition's users, counts and statistics."""
    folder = Path(parts_dir)
    u = np.fromfile(folder / f"{p}.u", dtype=np.int32)
    u -= lo  # user codes local to the partition
    i = np.fromfile(folder / f"{p}.i", dtype=np.int32)
    t = np.fromfile(folder / f"{p}.t", dtype=np.int64)
    for k in ("u", "i", "t"):
        os.remove(folder / f"{p}.{k}")
    res: dict[str, Any] = {"part": p, "duplicate": None, "dropped": {"duplicates": 0, "users": 0, "user_events": 0}}
    # Each step below holds the three columns, one int64 order and one gathered column at a
    # time (about 40 B per event), never copies of all three.
    if duplicates != "keep" and has_time:  # without times no two rows are equal
        o = np.lexsort((i, t, u))  # stable: equal rows stay in file order
        dup = np.zeros(len(o), dtype=bool)
        dup[1:] = True
        for col in (u, t, i):
            srt = col[o]
            dup[1:] &= srt[1:] == srt[:-1]
            del srt
        if dup.any():
            if duplicates == "error":
                j = o[np.flatnonzero(dup)[0]]
                res["duplicate"] = (int(u[j]) + lo, int(i[j]), int(t[j]))
                return res
            res["dropped"]["duplicates"] = int(dup.sum())
            keep = o[~dup]
            del o, dup
            keep.sort()  # back to file order
            u = u[keep]  # one column at a time: never two copies of all three
            i = i[keep]
            t = t[keep]
            del keep
        else:
            del o, dup
    o = np.lexsort((t, u))  # by user, then time; file order breaks ties
    u = u[o]
    i = i[o]
    t = t[o]
    del o
    n = np.bincount(u, minlength=hi - lo)
    short = (n > 0) & (n < min_user_interactions)
    if short.any():
        res["dropped"].update(users=int(short.sum()), user_events=int(n[short].sum()))
        keep_ev = ~short[u]
        u = u[keep_ev]
        i = i[keep_ev]
        t = t[keep_ev]
        del keep_ev
        n[short] = 0
    has = np.flatnonzero(n)
    key = u.astype(np.int64)  # (user, item) as one int64; np.unique would hold ~40 B/event
    del u
    key *= n_items
    key += i
    perm = np.argsort(key, kind="stable")  # stable: a pair's events stay in time order
    key = key[perm]
    first = np.ones(len(key), dtype=bool)
    first[1:] = key[1:] != key[:-1]
    del key
    rep = np.ones(len(i), dtype=bool)
    rep[perm[first]] = False  # each (user, item)'s first event is not a repeat
    del perm, first
    i.tofile(folder / f"{p}.items")
    t.tofile(folder / f"{p}.timestamps")
    rep.tofile(folder / f"{p}.repeats")
    res.update(
        kept_users=has + lo,
        counts=n[has],
        items_present=np.unique(i),
        t_min=int(t.min()) if len(t) else None,
        t_max=int(t.max()) if len(t) else None,
    )
    return res

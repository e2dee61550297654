"""Protocol splits and padded batches.

Legend: U users in a split, N = max_len, B batch rows.

Protocols (docs/models.md#evaluation-protocols):
* ``paper``: train on everything but each user's last item; test target = last item.
* ``loo-val``: train on everything but the last two; validation target = second-to-last
  (history = the items before it); test target = last (history includes the validation item).

Sequences are left-aligned: real items at positions 0..len-1, zeros after. For position i the
*query timestamp* is the timestamp of the item that follows it (the target's timestamp at
the last real position), which the temporal attention channel reads; the target id is never
part of the input.

With ``ds.target_behavior`` (``data.target_behavior``, docs/datasets.md#target-behaviour) the
targets are the events of that behaviour: the held-out ones are each user's last (and, under
loo-val, second-to-last) such event, with every earlier event as history; training ends at the
first held-out target and its loss counts only positions whose next event has the behaviour.
Behaviour codes (when the dataset has them) travel with the ids in ``behaviors``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from .behaviors import behavior_code, target_points
from .prepared import PreparedDataset


def split_points(ds: PreparedDataset, protocol: str) -> dict[str, np.ndarray]:
    """Absolute flat indices: ``train_end`` per user and the target index of each eval split
    (-1 for a user without one: too few target-behaviour events)."""
    if ds.target_behavior is not None:
        code = behavior_code(ds.behavior_names, ds.target_behavior)
        assert ds.behaviors is not None and ds.behavior_names is not None
        return target_points(ds.offsets, ds.behaviors, code, ds.behavior_names, protocol, ds.name)
    ends = ds.offsets[1:]
    if protocol == "paper":
        return {"train_end": ends - 1, "test": ends - 1}
    if protocol == "loo-val":
        return {"train_end": ends - 2, "valid": ends - 2, "test": ends - 1}
    raise ValueError(f"unknown protocol {protocol!r}; use 'loo-val' or 'paper'")


def _windows(ds: PreparedDataset, start: np.ndarray, end: np.ndarray, width: int, cols: int | None = None):
    """Gather ``items[start:end]`` and timestamps, keeping the last ``width``; left-aligned;
    only the first ``cols`` columns (default all ``width``). Ids come back as int64."""
    first = np.maximum(start, end - width)
    n = end - first
    cols = width if cols is None else cols
    idx = first[:, None] + np.arange(cols)[None, :]
    mask = np.arange(cols)[None, :] < n[:, None]
    idx = np.where(mask, idx, 0)
    items = np.where(mask, ds.items[idx], 0).astype(np.int64, copy=False)
    ts = np.where(mask, ds.timestamps[idx], 0).astype(np.int64, copy=False)
    behaviors = np.where(mask, ds.behaviors[idx].astype(np.int64), 0) if ds.behaviors is not None else None
    return items, ts, behaviors, n


# A split's dense (rows, width) matrices are built whole while each stays under this many
# elements (1 GiB of int64); above it they are :class:`LazyRows`, gathered from the CSR arrays
# one batch at a time, so host memory does not grow with users x max_len (docs/performance.md#scale)
DENSE_LIMIT = 1 << 27


class LazyRows:
    """A (U, width) int64 matrix that is never held whole: ``m[rows, :n]`` (rows an index
    array, a slice, a mask or one int) gathers just those rows from the dataset's CSR arrays.
    ``np.asarray(m)`` builds it all (small data and tests only)."""

    dtype = np.dtype(np.int64)

    def __init__(self, num_rows: int, width: int, gather: Callable[[np.ndarray, int], np.ndarray]):
        self.shape = (num_rows, width)
        self._gather = gather  # (row indices, columns) -> (len(rows), columns)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, key: Any) -> np.ndarray:
        rows, cols = key if isinstance(key, tuple) else (key, slice(None))
        one = isinstance(rows, (int, np.integer))
        if one:
            idx = np.asarray([rows])
        elif isinstance(rows, slice):
            idx = np.arange(*rows.indices(self.shape[0]))
        else:
            idx = np.asarray(rows)
            idx = np.flatnonzero(idx) if idx.dtype == bool else idx
        if isinstance(cols, slice) and cols.start in (None, 0) and cols.step in (None, 1):
            out = self._gather(idx, min(self.shape[1], self.shape[1] if cols.stop is None else cols.stop))
        else:
            out = self._gather(idx, self.shape[1])[:, cols]
        return out[0] if one else out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[:]
        return out if dtype is None else out.astype(dtype)


Matrix = np.ndarray | LazyRows


@dataclass
class TrainArrays:
    """Padded training windows: inputs and next-item targets at every position."""

    ids: Matrix  # (U, N) int64
    ts: Matrix  # (U, N) int64, timestamps of the inputs
    targets: Matrix  # (U, N) int64, 0 where no target
    query_ts: Matrix  # (U, N) int64, timestamps of the targets
    lengths: np.ndarray  # (U,)
    behaviors: Matrix | None = None  # (U, N) int64 behaviour codes of the inputs, 0 = padding

    def __len__(self) -> int:
        return len(self.lengths)


def train_arrays(ds: PreparedDataset, protocol: str, max_len: int, dense_limit: int = DENSE_LIMIT) -> TrainArrays:
    pts = split_points(ds, protocol)
    start, end = ds.offsets[:-1], pts["train_end"]
    code = behavior_code(ds.behavior_names, ds.target_behavior) if ds.target_behavior is not None else None
    W = max_len + 1

    def targets_of(w: tuple) -> np.ndarray:
        items, _, beh, _ = w
        t = items[:, 1:].copy()
        if code is not None:  # only next events of the target behaviour are targets
            t[beh[:, 1:] != code] = 0
        return t

    if ds.num_users * W <= dense_limit:
        w = _windows(ds, start, end, W)
        items, ts, beh, n = w
        ids, targets = items[:, :-1].copy(), targets_of(w)
        keep = (n >= 2) & (targets != 0).any(1)
        ids, targets, ts, n = ids[keep], targets[keep], ts[keep], n[keep]
        in_ts, q_ts = ts[:, :-1].copy(), ts[:, 1:].copy()
        in_beh = beh[keep][:, :-1].copy() if beh is not None else None
        return TrainArrays(ids=ids, ts=in_ts, targets=targets, query_ts=q_ts, lengths=n - 1, behaviors=in_beh)
    # lazy: which rows to keep, in blocks of users; then windows gathered per batch
    n_all = np.minimum(end - start, W)
    keep = n_all >= 2
    if code is not None:
        block = max(1, dense_limit // W)
        for b in range(0, ds.num_users, block):
            sl = slice(b, b + block)
            keep[sl] &= (targets_of(_windows(ds, start[sl], end[sl], W)) != 0).any(1)
    rows = np.flatnonzero(keep)
    s, e = start[rows], end[rows]
    U, N = len(rows), max_len

    last: list[tuple] = [((), None)]  # the last batch's windows: a batch reads every field of the same rows

    def win(r: np.ndarray, c: int) -> tuple:
        """The windows of rows ``r`` with ``c`` + 1 columns (inputs are columns ..c, targets and
        their times 1..c+1), gathered once for all the fields of a batch."""
        r = np.asarray(r, dtype=np.int64)  # one key per set of rows, whatever the index dtype
        key = (c, r.tobytes())
        held = last[0]  # one read: a batch built in another thread replaces the tuple whole
        if held[0] == key:
            return held[1]
        w = _windows(ds, s[r], e[r], W, c + 1)
        last[0] = (key, w)
        return w

    # targets and query times at column j are the items and times at column j + 1; each field
    # its own copy (no two share the cached buffer)
    return TrainArrays(
        ids=LazyRows(U, N, lambda r, c: win(r, c)[0][:, :c].copy()),
        ts=LazyRows(U, N, lambda r, c: win(r, c)[1][:, :c].copy()),
        targets=LazyRows(U, N, lambda r, c: targets_of(win(r, c))),
        query_ts=LazyRows(U, N, lambda r, c: win(r, c)[1][:, 1:].copy()),
        lengths=n_all[rows] - 1,
        behaviors=LazyRows(U, N, lambda r, c: win(r, c)[2][:, :c].copy()) if ds.behaviors is not None else None,
    )


@dataclass
class EvalArrays:
    """One evaluation split: the most recent history, the target and its timestamp."""

    users: np.ndarray  # (U,) dataset user index
    ids: Matrix  # (U, N)
    ts: Matrix  # (U, N)
    query_ts: Matrix  # (U, N), the last real position holds the target's timestamp
    lengths: np.ndarray  # (U,)
    targets: np.ndarray  # (U,)
    hist_start: np.ndarray  # (U,) flat index where the full history starts (for filtering)
    hist_end: np.ndarray  # (U,) flat index one past the history (= target index)
    behaviors: Matrix | None = None  # (U, N) behaviour codes of the history, 0 = padding

    def __len__(self) -> int:
        return len(self.users)


def eval_arrays(ds: PreparedDataset, protocol: str, split: str, max_len: int, dense_limit: int = DENSE_LIMIT) -> EvalArrays:
    pts = split_points(ds, protocol)
    if split not in pts or split == "train_end":
        raise ValueError(f"protocol {protocol!r} has no {split!r} split (it has: {', '.join(k for k in pts if k != 'train_end')})")
    tgt = pts[split]
    start = ds.offsets[:-1]
    users = np.flatnonzero((tgt >= 0) & (tgt - start >= 1))  # a target and at least one history item
    start, tgt = start[users], tgt[users]

    def query_ts(ts: np.ndarray, n: np.ndarray, t: np.ndarray) -> np.ndarray:
        """Position i sees the time of the item after it; the last real one the target's."""
        cols = ts.shape[1]
        q = np.zeros_like(ts)
        q[:, :-1] = ts[:, 1:]
        last = n - 1 < cols
        q[np.flatnonzero(last), (n - 1)[last]] = ds.timestamps[t[last]]
        return np.where(np.arange(cols)[None, :] < n[:, None], q, 0)

    common = dict(users=users, targets=ds.items[tgt].astype(np.int64), hist_start=start, hist_end=tgt)
    if len(users) * max_len <= dense_limit:
        ids, ts, beh, n = _windows(ds, start, tgt, max_len)
        return EvalArrays(ids=ids, ts=ts, query_ts=query_ts(ts, n, tgt), lengths=n, behaviors=beh, **common)

    def win(r: np.ndarray, c: int) -> tuple:
        return _windows(ds, start[r], tgt[r], max_len, c)

    def q_rows(r: np.ndarray, c: int) -> np.ndarray:
        _, ts, _, n = win(r, min(c + 1, max_len))  # the column after the last one asked
        return query_ts(ts, n, tgt[r])[:, :c]

    U = len(users)
    return EvalArrays(
        ids=LazyRows(U, max_len, lambda r, c: win(r, c)[0]),
        ts=LazyRows(U, max_len, lambda r, c: win(r, c)[1]),
        query_ts=LazyRows(U, max_len, q_rows),
        lengths=np.minimum(tgt - start, max_len),
        behaviors=LazyRows(U, max_len, lambda r, c: win(r, c)[2]) if ds.behaviors is not None else None,
        **common,
    )


def length_sorted_chunks(lengths: np.ndarray, chunks: int) -> list[np.ndarray]:
    """Positions 0..len(lengths)-1 sorted by length (stable) and split into ``chunks`` parts of
    near-equal size: the rows of a batch that run together when it is run in length chunks
    (each part is padded only to its own longest row)."""
    return np.array_split(np.argsort(lengths, kind="stable"), chunks)

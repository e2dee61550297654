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

from dataclasses import dataclass

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


def _windows(ds: PreparedDataset, start: np.ndarray, end: np.ndarray, width: int):
    """Gather ``items[start:end]`` and timestamps, keeping the last ``width``; left-aligned."""
    first = np.maximum(start, end - width)
    n = end - first
    idx = first[:, None] + np.arange(width)[None, :]
    mask = np.arange(width)[None, :] < n[:, None]
    idx = np.where(mask, idx, 0)
    items = np.where(mask, ds.items[idx], 0)
    ts = np.where(mask, ds.timestamps[idx], 0)
    behaviors = np.where(mask, ds.behaviors[idx].astype(np.int64), 0) if ds.behaviors is not None else None
    return items, ts, behaviors, n


@dataclass
class TrainArrays:
    """Padded training windows: inputs and next-item targets at every position."""

    ids: np.ndarray  # (U, N) int64
    ts: np.ndarray  # (U, N) int64, timestamps of the inputs
    targets: np.ndarray  # (U, N) int64, 0 where no target
    query_ts: np.ndarray  # (U, N) int64, timestamps of the targets
    lengths: np.ndarray  # (U,)
    behaviors: np.ndarray | None = None  # (U, N) int64 behaviour codes of the inputs, 0 = padding

    def __len__(self) -> int:
        return len(self.lengths)


def train_arrays(ds: PreparedDataset, protocol: str, max_len: int) -> TrainArrays:
    pts = split_points(ds, protocol)
    start = ds.offsets[:-1]
    items, ts, beh, n = _windows(ds, start, pts["train_end"], max_len + 1)
    ids, targets = items[:, :-1].copy(), items[:, 1:].copy()
    if ds.target_behavior is not None:  # only next events of the target behaviour are targets
        assert beh is not None
        targets[beh[:, 1:] != behavior_code(ds.behavior_names, ds.target_behavior)] = 0
    keep = (n >= 2) & (targets != 0).any(1)
    ids, targets, ts, n = ids[keep], targets[keep], ts[keep], n[keep]
    in_ts, q_ts = ts[:, :-1].copy(), ts[:, 1:].copy()
    in_beh = beh[keep][:, :-1].copy() if beh is not None else None
    return TrainArrays(ids=ids, ts=in_ts, targets=targets, query_ts=q_ts, lengths=n - 1, behaviors=in_beh)


@dataclass
class EvalArrays:
    """One evaluation split: the most recent history, the target and its timestamp."""

    users: np.ndarray  # (U,) dataset user index
    ids: np.ndarray  # (U, N)
    ts: np.ndarray  # (U, N)
    query_ts: np.ndarray  # (U, N), the last real position holds the target's timestamp
    lengths: np.ndarray  # (U,)
    targets: np.ndarray  # (U,)
    hist_start: np.ndarray  # (U,) flat index where the full history starts (for filtering)
    hist_end: np.ndarray  # (U,) flat index one past the history (= target index)
    behaviors: np.ndarray | None = None  # (U, N) behaviour codes of the history, 0 = padding

    def __len__(self) -> int:
        return len(self.users)


def eval_arrays(ds: PreparedDataset, protocol: str, split: str, max_len: int) -> EvalArrays:
    pts = split_points(ds, protocol)
    if split not in pts or split == "train_end":
        raise ValueError(f"protocol {protocol!r} has no {split!r} split (it has: {', '.join(k for k in pts if k != 'train_end')})")
    tgt = pts[split]
    start = ds.offsets[:-1]
    users = np.flatnonzero((tgt >= 0) & (tgt - start >= 1))  # a target and at least one history item
    start, tgt = start[users], tgt[users]
    ids, ts, beh, n = _windows(ds, start, tgt, max_len)
    q_ts = np.zeros_like(ts)
    q_ts[:, :-1] = ts[:, 1:]
    rows = np.arange(len(users))
    q_ts[rows, n - 1] = ds.timestamps[tgt]
    q_ts = np.where(np.arange(max_len)[None, :] < n[:, None], q_ts, 0)
    return EvalArrays(
        users=users,
        ids=ids,
        ts=ts,
        query_ts=q_ts,
        lengths=n,
        targets=ds.items[tgt],
        hist_start=start,
        hist_end=tgt,
        behaviors=beh,
    )


def length_sorted_chunks(lengths: np.ndarray, chunks: int) -> list[np.ndarray]:
    """Positions 0..len(lengths)-1 sorted by length (stable) and split into ``chunks`` parts of
    near-equal size: the rows of a batch that run together when it is run in length chunks
    (each part is padded only to its own longest row)."""
    return np.array_split(np.argsort(lengths, kind="stable"), chunks)

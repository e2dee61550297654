"""The batch: one typed record for training and evaluation, built by one function.

Legend: B rows, N width (the longest row of the batch, or a fixed width), P positions that have
a target, K negatives per position.

Rows are left-aligned: real items at positions 0..len-1, zeros after. ``targets[b, i]`` is the
item that follows position i (0 where none): in training every position of the training
window; in evaluation the positions inside the history and, at the last real position, the
held-out item (``Batch.target``). The model never sees a target as input. The CUDA-graph
step's static batches carry only what the step reads (inputs, positions, their targets and
negatives); their ``targets`` and ``lengths`` are empty.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .splits import EvalArrays, TrainArrays


@dataclass
class Batch:
    ids: torch.Tensor  # (B, N) int64 item ids, 0 = padding
    ts: torch.Tensor  # (B, N) timestamps of the inputs
    query_ts: torch.Tensor  # (B, N) timestamp of the next item at each position
    lengths: torch.Tensor  # (B,) real positions per row
    targets: torch.Tensor  # (B, N) next item at each position, 0 where none
    # training only: the flat indices into B*N of the positions with a target, those targets,
    # and the negatives drawn for them (K = 0 for the full softmax)
    positions: torch.Tensor | None = None  # (P,)
    pos_targets: torch.Tensor | None = None  # (P,)
    negatives: torch.Tensor | None = None  # (P, K)
    rows: np.ndarray | None = None  # (B,) the rows of the arrays this batch holds
    # (B, N) int64 behaviour code of each input event (0 = padding), when the data has behaviours
    behaviors: torch.Tensor | None = None

    @property
    def target(self) -> torch.Tensor:
        """(B,) the item after each row's last real position (the evaluation target)."""
        return self.targets[torch.arange(len(self.lengths), device=self.targets.device), self.lengths - 1]


@dataclass
class NegativeSampler:
    """Uniform negatives in 1..num_items, K per position, from one generator: the same draws
    for a global batch whatever the number of ranks, chunks or whether it is replayed from a
    CUDA graph."""

    num_items: int
    k: int
    generator: torch.Generator
    device: torch.device

    def draw(self, rows: int, width: int) -> torch.Tensor:
        """(rows, width, K) item ids."""
        return torch.randint(1, self.num_items + 1, (rows, width, self.k), device=self.device, generator=self.generator)


def _width(arrs: TrainArrays | EvalArrays, rows: np.ndarray, width: int | None) -> int:
    if width is not None:
        return width
    return int(arrs.lengths[rows].max()) if len(rows) else arrs.ids.shape[1]


def make_batch(
    arrs: TrainArrays | EvalArrays,
    rows: np.ndarray,
    device: torch.device | str = "cpu",
    width: int | None = None,
    negatives: torch.Tensor | NegativeSampler | None = None,
) -> Batch:
    """Rows of the training or evaluation arrays as a :class:`Batch` on ``device``, ``width``
    columns wide (default: the longest row's length).

    For training arrays the target positions are found on the host (no device sync) and, with
    ``negatives`` (a sampler, or (len(rows), width, K) ids drawn for these rows), the negatives
    at those positions are gathered on the device."""
    rows = np.asarray(rows)
    n = _width(arrs, rows, width)
    put = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(device, non_blocking=True)  # noqa: E731
    if isinstance(arrs, TrainArrays):
        targets_np = arrs.targets[rows, :n]
    else:  # the history's own next items, and the held-out item at the last real position
        targets_np = np.zeros((len(rows), n), dtype=np.int64)
        targets_np[:, :-1] = arrs.ids[rows, 1:n]
        lens = arrs.lengths[rows]
        targets_np[np.arange(len(rows)), lens - 1] = arrs.targets[rows]
        targets_np[np.arange(n)[None, :] >= lens[:, None]] = 0
    batch = Batch(
        ids=put(arrs.ids[rows, :n]),
        ts=put(arrs.ts[rows, :n]),
        query_ts=put(arrs.query_ts[rows, :n]),
        lengths=put(arrs.lengths[rows]),
        targets=put(targets_np),
        rows=rows,
        behaviors=put(arrs.behaviors[rows, :n]) if arrs.behaviors is not None else None,
    )
    if isinstance(arrs, TrainArrays):
        flat = np.flatnonzero(targets_np.reshape(-1))
        batch.positions = put(flat)
        batch.pos_targets = put(targets_np.reshape(-1)[flat])
        if isinstance(negatives, NegativeSampler):
            negatives = negatives.draw(len(rows), n)
        if negatives is not None:
            batch.negatives = negatives[:, :n].reshape(len(rows) * n, negatives.shape[-1]).index_select(0, batch.positions)
    return batch

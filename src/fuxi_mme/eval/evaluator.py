"""Full-ranking evaluation over all items, in batches (ML-20M-sized catalogues fit).

Legend: B users in a batch, I items (+1 padding column), D scoring width.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

from ..data.prepared import PreparedDataset, flat_ranges
from ..data.splits import EvalArrays, split_points, to_batch
from ..models.common import SequenceModel
from .metrics import metrics_from_ranks, ranks_from_scores

Scorer = Callable[[dict[str, torch.Tensor]], torch.Tensor]  # batch -> (B, I+1) scores


def history_pairs(arrs: EvalArrays, rows: np.ndarray, ds: PreparedDataset) -> tuple[np.ndarray, np.ndarray]:
    """(row-in-batch, item) for every item in each user's full history (not only the last N)."""
    start, end = arrs.hist_start[rows], arrs.hist_end[rows]
    return np.repeat(np.arange(len(rows)), end - start), ds.items[flat_ranges(start, end)]


def autocast_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype for ``train.amp``, on every device. Training, its evaluations,
    ``fuxi-mme evaluate`` and serving all use it, so a run's numbers reproduce everywhere."""
    return torch.bfloat16 if amp == "bf16" else None


def encode_last(model: SequenceModel, batch: dict[str, torch.Tensor], amp: torch.dtype | None = None) -> torch.Tensor:
    """(B, D) fp32 user vectors at each row's last real position: what the next item is scored
    against. Shared by evaluation, ``recommend`` and the HTTP service."""
    dev = batch["ids"].device
    with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        user_BND = model(batch["ids"], batch["ts"], batch["query_ts"])
    last = batch["lengths"] - 1
    return user_BND[torch.arange(len(last), device=dev), last].float()


def model_scorer(model: SequenceModel, amp: torch.dtype | None = None) -> Scorer:
    """Scores = last-position user vector . every item vector (items computed once)."""
    items_ID = None

    def score(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        nonlocal items_ID
        if items_ID is None:
            with torch.autocast(batch["ids"].device.type, dtype=amp, enabled=amp is not None):
                items_ID = model.item_vectors().float()
        return encode_last(model, batch, amp) @ items_ID.T

    return score


def popularity_scorer(ds: PreparedDataset, protocol: str, device: torch.device | str = "cpu") -> Scorer:
    """Item counts in the training part of each sequence (no test or validation targets)."""
    idx = flat_ranges(ds.offsets[:-1], split_points(ds, protocol)["train_end"])
    counts = torch.from_numpy(np.bincount(ds.items[idx], minlength=ds.num_items + 1).astype(np.float32)).to(device)

    def score(batch):
        return counts.expand(len(batch["lengths"]), -1).clone()

    return score


@torch.no_grad()
def evaluate_ranks(
    scorer: Scorer,
    arrs: EvalArrays,
    ds: PreparedDataset,
    filter_history: bool = True,
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """1-based rank of each target among all items (padding never a candidate), in the order of
    ``rows`` (default: every row). Batches take the rows shortest first, so each is padded only
    to its own longest sequence (``to_batch`` trims) rather than short histories being scored at
    the width of a long one; a scorer sees the batch's row indices in ``batch["rows"]``."""
    rows_all = np.arange(len(arrs)) if rows is None else np.asarray(rows)
    order = np.argsort(arrs.lengths[rows_all], kind="stable")
    out = np.zeros(len(rows_all), dtype=np.int64)
    for s in range(0, len(order), batch_size):
        at = order[s : s + batch_size]
        rows_b = rows_all[at]
        batch = to_batch(arrs, rows_b, device)
        batch["rows"] = torch.from_numpy(rows_b)
        scores = scorer(batch).float()
        scores[:, 0] = -torch.inf
        if filter_history:
            r, it = history_pairs(arrs, rows_b, ds)
            tgt = torch.from_numpy(arrs.targets[rows_b])
            keep = it != tgt.numpy()[r]  # the target stays a candidate even if seen before
            scores[torch.from_numpy(r[keep]).to(scores.device), torch.from_numpy(it[keep]).to(scores.device)] = -torch.inf
        out[at] = ranks_from_scores(scores, batch["target"]).cpu().numpy()
    return out


def evaluate(scorer: Scorer, arrs: EvalArrays, ds: PreparedDataset, ks=(10, 50, 200), filter_history=True, batch_size=1024, device="cpu") -> dict[str, float]:
    ranks = evaluate_ranks(scorer, arrs, ds, filter_history, batch_size, device)
    m = metrics_from_ranks(ranks, ks)
    m["users"] = int(len(ranks))
    return m

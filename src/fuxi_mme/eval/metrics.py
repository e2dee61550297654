"""Pure ranking metrics from 1-based ranks (rank = 1 + number of candidates scored strictly
higher than the target, so ties are resolved in the target's favour, as in docs/models.md#metrics)."""

from __future__ import annotations

import numpy as np
import torch


def ranks_from_scores(scores_BI: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
    """(B, I) scores, (B,) target column -> (B,) 1-based ranks. -inf candidates never outrank;
    a NaN candidate always does (a non-finite score never lifts a target), and a target whose
    own score is NaN ranks last (I)."""
    t = scores_BI.gather(1, target_B[:, None])
    above = (scores_BI > t) | torch.isnan(scores_BI)
    ranks = 1 + above.sum(1) - torch.isnan(t[:, 0]).long()  # the target never counts itself
    return torch.where(torch.isnan(t[:, 0]), torch.full_like(ranks, scores_BI.shape[1]), ranks)


def metrics_from_ranks(ranks: np.ndarray | torch.Tensor, ks=(10, 50, 200)) -> dict[str, float]:
    """HR@K, NDCG@K (one relevant item: 1/log2(rank+1) if rank <= K) and MRR (no cut-off)."""
    r = np.asarray(ranks.cpu() if isinstance(ranks, torch.Tensor) else ranks, dtype=np.float64)
    if r.size == 0:
        raise ValueError("no evaluation users: every user's history is empty under this protocol")
    out: dict[str, float] = {}
    for k in ks:
        hit = r <= k
        out[f"HR@{k}"] = float(hit.mean())
        out[f"NDCG@{k}"] = float(np.where(hit, 1.0 / np.log2(r + 1.0), 0.0).mean())
    out["MRR"] = float((1.0 / r).mean())
    return out

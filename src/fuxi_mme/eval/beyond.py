"""Beyond-accuracy metrics from the evaluator's full-ranking top-K lists: catalogue coverage,
Gini index, Shannon entropy, novelty, average popularity, long-tail share and intra-list
diversity (definitions: docs/training.md#beyond-accuracy-metrics).

The evaluator takes each batch's top-K (K = max of ``eval.ks``) once, after masking, on its
device; :class:`BeyondAccumulator` counts how often each item is recommended at every cut-off
(one scatter-add per batch) and sums each list's diversity. Everything else is computed once
at the end from the counts (:func:`beyond_metrics`), so counts summed over ranks give exactly
one process's numbers.

Legend: B users in a batch, K the largest cut-off, C cut-offs, I items (+1 padding column),
F item features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.prepared import PreparedDataset, range_blocks

HEAD_SHARE = 0.8  # the short head: the most popular items that make 80% of training interactions
ILD_CHUNK = 1 << 23  # rows x K x F elements gathered at a time for diversity


@dataclass
class Popularity:
    """Training-part popularity of every item (index 0, padding, is zero)."""

    interactions: np.ndarray  # (I+1,) training interactions of the item
    users: np.ndarray  # (I+1,) distinct training users of the item
    train_users: int  # users with at least one training interaction
    tail: np.ndarray  # (I+1,) bool: outside the short head (padding excluded)

    @property
    def head_items(self) -> int:
        return int((~self.tail[1:]).sum())


def long_tail(interactions: np.ndarray, head_share: float = HEAD_SHARE) -> np.ndarray:
    """(I+1,) bool long-tail flags from training interaction counts (index 0 is padding, never
    tail). The head is the fewest most-popular items whose interactions reach ``head_share`` of
    all (ties in count broken by the smaller id); every other item, unseen ones included, is tail."""
    counts = np.asarray(interactions[1:], dtype=np.float64)
    tail = np.zeros(len(interactions), dtype=bool)
    total = counts.sum()
    if total <= 0:
        tail[1:] = True
        return tail
    order = np.lexsort((np.arange(len(counts)), -counts))  # most popular first, then by id
    cum = np.cumsum(counts[order])
    n_head = int(np.searchsorted(cum, head_share * total - 1e-9 * total) + 1)
    tail[1:] = True
    tail[1 + order[:n_head]] = False
    return tail


def popularity(ds: PreparedDataset, train_end: np.ndarray) -> Popularity:
    """Popularity in the training part ``[offsets[u], train_end[u])`` of every user's sequence."""
    from ..data.repeats import repeat_flags

    flags = repeat_flags(ds)
    inter = np.zeros(ds.num_items + 1, dtype=np.int64)
    users = np.zeros(ds.num_items + 1, dtype=np.int64)
    for idx in range_blocks(ds.offsets[:-1], train_end):  # pieces of users: large logs
        items = ds.items[idx]
        inter += np.bincount(items, minlength=ds.num_items + 1)
        users += np.bincount(items[~flags[idx]], minlength=ds.num_items + 1)  # a user's first event with the item
    inter[0] = users[0] = 0
    return Popularity(inter, users, int((train_end > ds.offsets[:-1]).sum()), long_tail(inter))


def training_end(ds: PreparedDataset, protocol: str | None, hist_end: np.ndarray, users: np.ndarray) -> np.ndarray:
    """Per-user end of the training part: the protocol's (``split_points``; what the model and
    the popularity baseline train on), else each evaluated user's events before its target."""
    if protocol is not None:
        from ..data.splits import split_points

        return split_points(ds, protocol)["train_end"]
    end = ds.offsets[:-1].copy()  # users without a target in this split: nothing
    end[users] = hist_end
    return end


def popularity_cached(ds: PreparedDataset, protocol: str | None, hist_end: np.ndarray, users: np.ndarray) -> Popularity:
    """:func:`popularity` of :func:`training_end`, kept on the dataset per protocol (an
    evaluation every epoch computes it once)."""
    cache = ds.__dict__.setdefault("_beyond_popularity", {})
    key = protocol if protocol is not None else ("histories", hist_end.tobytes())
    if key not in cache or len(cache[key].interactions) != ds.num_items + 1:
        cache[key] = popularity(ds, training_end(ds, protocol, hist_end, users))
    return cache[key]


class BeyondAccumulator:
    """Per-item recommendation counts at every cut-off (on the evaluation device) and each
    batch's intra-list diversity sums. ``features_IF``: multi-hot (I+1, F) or None."""

    def __init__(self, ks: tuple[int, ...], num_items: int, features_IF: np.ndarray | None, device: torch.device | str):
        self.ks = tuple(sorted(set(ks)))
        self.kmax = min(self.ks[-1], num_items + 1)
        self.num_items = num_items
        dev = torch.device(device)
        # position p of a list counts for cut-off k when p < k: its band is the number of cut-offs <= p
        pos = torch.arange(self.kmax, device=dev)
        self.band_K = (pos[:, None] >= torch.tensor(self.ks, device=dev)[None, :]).sum(1)
        self.band_counts_CI = torch.zeros(len(self.ks), num_items + 1, dtype=torch.int64, device=dev)
        self.unit_IF = self.has_I = None
        if features_IF is not None:
            f = torch.as_tensor(np.asarray(features_IF, dtype=np.float64), device=dev)
            norm = f.norm(dim=1, keepdim=True)
            self.unit_IF = torch.where(norm > 0, f / norm.clamp(min=1e-12), torch.zeros_like(f)).float()
            self.unit_IF[0] = 0  # padding: where masked positions point
            self.has_I = (norm[:, 0] > 0).float()
            self.has_I[0] = 0
            # prefix indicator: S_k = sum of the first k positions' unit vectors
            self.prefix_CK = (pos[None, :] < torch.tensor(self.ks, device=dev)[:, None]).float()

    def add(self, scores_BI: torch.Tensor) -> torch.Tensor | None:
        """Count one batch's top-K lists (candidates at -inf or NaN, masked or padding, are left
        out); returns its (C, 2) [sum of list ILD, lists with ILD] or None without features."""
        vals_BK, ids_BK = scores_BI.topk(self.kmax, dim=1)
        valid_BK = vals_BK > -torch.inf  # False for -inf and NaN
        band_BK = self.band_K.expand_as(ids_BK)
        flat = band_BK * (self.num_items + 1) + ids_BK
        self.band_counts_CI.view(-1).scatter_add_(0, flat.reshape(-1), valid_BK.reshape(-1).long())
        if self.unit_IF is None:
            return None
        return self._ild(ids_BK, valid_BK)

    def _ild(self, ids_BK: torch.Tensor, valid_BK: torch.Tensor) -> torch.Tensor:
        """Sum over the batch's lists of ILD = 1 - mean pairwise cosine similarity of the
        featured items' multi-hot vectors, via sum_{i<j} u_i.u_j = (|sum u|^2 - n) / 2 on
        unit vectors u; lists with fewer than two featured items are left out."""
        assert self.unit_IF is not None and self.has_I is not None
        F = self.unit_IF.shape[1]
        rows = max(1, ILD_CHUNK // max(1, self.kmax * F))
        out = torch.zeros(len(self.ks), 2, dtype=torch.float64, device=ids_BK.device)
        ids_BK = torch.where(valid_BK, ids_BK, torch.zeros_like(ids_BK))  # left-out positions -> padding (no features)
        for s in range(0, len(ids_BK), rows):
            ids = ids_BK[s : s + rows]
            n_BC = (self.has_I[ids] @ self.prefix_CK.T).double()
            S_BCF = self.prefix_CK @ self.unit_IF[ids]  # (C, K) @ (B, K, F)
            sim_BC = ((S_BCF * S_BCF).sum(-1).double() - n_BC) / 2
            pairs_BC = n_BC * (n_BC - 1) / 2
            has_BC = pairs_BC > 0
            ild_BC = torch.where(has_BC, 1 - sim_BC / pairs_BC.clamp(min=1), torch.zeros_like(sim_BC))
            out += torch.stack([ild_BC.sum(0), has_BC.sum(0).double()], 1)
        return out

    def counts(self) -> np.ndarray:
        """(C, I+1) int64: how many lists hold each item at each cut-off (ascending ``ks``)."""
        return self.band_counts_CI.cumsum(0).cpu().numpy()


def gini(counts: np.ndarray) -> float:
    """Gini index of the items' recommendation counts (every catalogue item, zeros included):
    sum_i (2i - n - 1) c_(i) / (n sum c) over counts sorted ascending, i = 1..n; 0 when every
    item is recommended equally often, (n - 1) / n when one item takes every slot."""
    c = np.sort(np.asarray(counts, dtype=np.float64))
    n, total = len(c), c.sum()
    if n == 0 or total == 0:
        return 0.0
    i = np.arange(1, n + 1)
    return float(((2 * i - n - 1) * c).sum() / (n * total))


def beyond_metrics(
    counts_CI: np.ndarray, ks: tuple[int, ...], pop: Popularity, ild_C2: np.ndarray | None = None, ild_note: str = ""
) -> dict[str, Any]:
    """The metrics at each cut-off of ``ks`` (the accumulator's ascending order) from the
    summed counts, the training popularity and the summed ILD; a note where ILD is skipped."""
    out: dict[str, Any] = {}
    info = np.maximum(pop.users, 1) / max(pop.train_users, 1)  # an item no training user had counts as one user's
    self_info = -np.log2(np.minimum(info, 1.0))
    for c, k in enumerate(ks):
        cnt = counts_CI[c, 1:].astype(np.float64)
        total = cnt.sum()
        if total == 0:
            continue
        p = cnt / total
        nz = p[p > 0]
        out[f"Coverage@{k}"] = float((cnt > 0).mean())
        out[f"Gini@{k}"] = gini(cnt)
        out[f"Entropy@{k}"] = float(-(nz * np.log2(nz)).sum())
        out[f"Novelty@{k}"] = float((p * self_info[1:]).sum())
        out[f"AvgPop@{k}"] = float((p * pop.interactions[1:]).sum())
        out[f"LongTail@{k}"] = float(p[pop.tail[1:]].sum())
        if ild_C2 is not None and ild_C2[c, 1] > 0:
            out[f"ILD@{k}"] = float(ild_C2[c, 0] / ild_C2[c, 1])
    out["catalogue"] = int(counts_CI.shape[1] - 1)
    out["head_items"] = pop.head_items
    if ild_note:
        out["notes"] = [ild_note]
    return out


# ------------------------------------------------------------------ printing

COLUMNS = ("Coverage", "Gini", "Entropy", "Novelty", "AvgPop", "LongTail", "ILD")


def beyond_block(rows: dict[str, dict[str, Any]]) -> str:
    """The compact second block under the printed metrics table: one line per split and cut-off
    (rows whose metrics have a ``beyond`` part), its notes below; "" when none has one."""
    lines: list[tuple[str, list[Any]]] = []
    notes: list[str] = []
    for name, m in rows.items():
        b = m.get("beyond") if isinstance(m, dict) else None
        if not isinstance(b, dict):
            continue
        ks = sorted({int(key.split("@")[1]) for key in b if "@" in key})
        for k in ks:
            lines.append((f"{name.split()[0]} @{k}", [b.get(f"{c}@{k}") for c in COLUMNS]))
        notes += [n for n in b.get("notes", []) if n not in notes]
    if not lines:
        return ""
    first = max(len("beyond accuracy"), *(len(n) for n, _ in lines))
    out = ["", "", "beyond accuracy".ljust(first) + "  " + "  ".join(c.rjust(8) for c in COLUMNS)]
    for label, cells in lines:
        out.append(label.ljust(first) + "  " + "  ".join(_cell(v, c).rjust(8) for v, c in zip(cells, COLUMNS)))
    out += [f"note: {n}" for n in notes]
    return "\n".join(out)


def _cell(v: Any, column: str = "") -> str:
    """One value of the block: AvgPop (a mean interaction count) with one decimal in every row,
    so a column reads alike; the others with four, or one from 100 up."""
    if v is None:
        return "-"
    if column == "AvgPop":
        return f"{v:.1f}"
    return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4f}"

"""Full-ranking evaluation over all items, in batches (ML-20M-sized catalogues fit).

Legend: B users in a batch, I items (+1 padding column), D scoring width.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ..data.batches import Batch, make_batch
from ..data.prepared import PreparedDataset, flat_ranges, range_blocks
from ..data.repeats import repeat_flags, repeat_summary
from ..data.splits import EvalArrays, split_points
from ..models.common import SequenceModel
from ..utils.runtime import interpreting
from .beyond import BeyondAccumulator, beyond_metrics, popularity_cached
from .buckets import bucket_metrics
from .metrics import metrics_from_ranks, ranks_from_scores

Scorer = Callable[[Batch], torch.Tensor]  # batch -> (B, I+1) scores

log = logging.getLogger(__name__)
PROGRESS_EVERY = 50  # batches between the (debug-level) progress lines of a long ranking


def history_pairs(arrs: EvalArrays, rows: np.ndarray, ds: PreparedDataset) -> tuple[np.ndarray, np.ndarray]:
    """(row-in-batch, item) for every item in each user's full history (not only the last N)."""
    start, end = arrs.hist_start[rows], arrs.hist_end[rows]
    return np.repeat(np.arange(len(rows)), end - start), ds.items[flat_ranges(start, end)].astype(np.int64, copy=False)


def encode_last(model: SequenceModel, batch: Batch, amp: torch.dtype | None = None) -> torch.Tensor:
    """(B, D) fp32 user vectors at each row's last real position: what the next item is scored
    against. Shared by evaluation, ``recommend`` and the HTTP service."""
    dev = batch.ids.device
    with torch.autocast(dev.type, dtype=amp, enabled=amp is not None):
        args = (batch.ids, batch.ts, batch.query_ts) + ((batch.behaviors,) if batch.behaviors is not None else ())
        user_BND = model(*args)
    last = batch.lengths - 1
    return user_BND[torch.arange(len(last), device=dev), last].float()


class VectorScorer:
    """Scores = last-position user vector . every item vector (items computed once). Called
    on a batch it gives the (B, I+1) scores; ``users`` and ``items`` give the two factors, which
    the fused ranking (``eval.ranking=fused``, :mod:`fuxi_mme.eval.rank_kernel`) takes instead."""

    def __init__(self, model: SequenceModel, amp: torch.dtype | None = None):
        self.model, self.amp = model, amp
        self._items_ID: torch.Tensor | None = None

    def items(self, device: torch.device) -> torch.Tensor:
        if self._items_ID is None:
            with torch.autocast(device.type, dtype=self.amp, enabled=self.amp is not None):
                self._items_ID = self.model.item_vectors().float()
        return self._items_ID

    def users(self, batch: Batch) -> torch.Tensor:
        return encode_last(self.model, batch, self.amp)

    def __call__(self, batch: Batch) -> torch.Tensor:
        return self.users(batch) @ self.items(batch.ids.device).T


def model_scorer(model: SequenceModel, amp: torch.dtype | None = None) -> VectorScorer:
    """The scorer of a model's full ranking (:class:`VectorScorer`)."""
    return VectorScorer(model, amp)


def popularity_scorer(ds: PreparedDataset, protocol: str, device: torch.device | str = "cpu") -> Scorer:
    """Item counts in the training part of each sequence (no test or validation targets)."""
    counts_np = np.zeros(ds.num_items + 1, dtype=np.int64)
    for idx in range_blocks(ds.offsets[:-1], split_points(ds, protocol)["train_end"]):
        counts_np += np.bincount(ds.items[idx], minlength=ds.num_items + 1)
    counts = torch.from_numpy(counts_np.astype(np.float32)).to(device)

    def score(batch: Batch) -> torch.Tensor:
        return counts.expand(len(batch.lengths), -1).clone()

    return score


HISTORY_MODES = ("auto", "mask", "keep")
# eval.history=auto masks the history unless more than this share of the training events
# repeat an item the user had before (docs/training.md#history-masking)
AUTO_REPEAT_THRESHOLD = 0.01


def resolve_history(setting: str, ds: PreparedDataset, protocol: str) -> tuple[str, str]:
    """``eval.history`` -> ("mask" | "keep", why). ``auto`` reads the training events only
    (never a validation or test target): ``keep`` when more than
    :data:`AUTO_REPEAT_THRESHOLD` of them repeat an earlier item of the same user, else ``mask``."""
    if setting not in HISTORY_MODES:
        raise ValueError(f"eval.history={setting!r} is not one of {', '.join(HISTORY_MODES)}")
    if setting != "auto":
        return setting, f"eval.history={setting}"
    rate = repeat_summary(ds, protocol)["train_repeat_rate"]
    if rate > AUTO_REPEAT_THRESHOLD:
        return (
            "keep",
            f"eval.history=auto: {rate:.1%} of training events repeat an earlier item of the user (> {AUTO_REPEAT_THRESHOLD:.0%}), "
            "so seen items stay candidates",
        )
    return (
        "mask",
        f"eval.history=auto: {rate:.2%} of training events repeat an earlier item of the user (<= {AUTO_REPEAT_THRESHOLD:.0%}), "
        "so seen items are masked",
    )


class NonFiniteScores(ValueError):
    """The model gave a target a NaN or infinite score: its metrics would be meaningless."""


@dataclass
class SplitRanks:
    """Per-row results of ranking one split, in the order of the rows asked for."""

    ranks: np.ndarray  # (U,) 1-based rank; a masked or non-finite target gets num_items + 1
    masked_target: np.ndarray  # (U,) bool: eval.history=mask removed the (repeated) target
    nonfinite: np.ndarray  # (U,) bool: the target's score was NaN or infinite
    ild: np.ndarray | None = None  # (batches, C, 2) per-batch diversity sums (eval/beyond.py), in batch order


SCORE_CELLS = 1 << 30  # scores of one evaluation batch: at most this many (4 GB of fp32)


FORWARD_TOKENS_CPU = 4096
"""Padded positions per model forward pass when evaluating on a CPU: a scoring batch's
length-sorted rows run through the model in chunks of about this many positions, each padded
only to its own longest row, and their scores are joined before ranking (the same ranks, up to
last-bit differences between padded widths that can swap near-tied items). Measured
on the 2-core CPU, Fuxi-MME on ML-100K, 943 validation users (mean length 89, cap 200), other
runs sharing the cores: one pass of the whole batch 18.0 s, chunks of 16,384 positions 4.1 s,
8,192 1.4 s, 4,096 1.2 s, 2,048 1.2 s, 1,024 1.6 s (docs/performance.md#cpu-epoch). A GPU
runs the whole batch in one pass."""


def forward_chunks(lengths: np.ndarray, budget: int) -> list[slice]:
    """Consecutive slices of rows sorted by ascending ``lengths``, each holding as many rows as
    fit ``budget`` padded positions (rows x the chunk's longest length), at least one."""
    out, s, n = [], 0, len(lengths)
    while s < n:
        e = s + 1
        while e < n and (e + 1 - s) * int(lengths[e]) <= budget:
            e += 1
        out.append(slice(s, e))
        s = e
    return out


def score_batch(batch_size: int, num_items: int) -> int:
    """``eval.batch_size`` users, fewer where the catalogue is so large that their scores
    (users x items) would pass :data:`SCORE_CELLS` (e.g. 107 users at 1e7 items)."""
    return max(1, min(batch_size, SCORE_CELLS // (num_items + 1)))


RANKING_MODES = ("auto", "scores", "fused")


def resolve_ranking(setting: str, scorer: Scorer, device: torch.device | str, beyond: bool) -> str:
    """``eval.ranking`` -> "scores" or "fused" (docs/training.md#fused-ranking). ``auto`` is
    fused where it can run (a model's vectors, a CUDA GPU with triton, beyond-accuracy metrics
    off: they read top-K lists of the scores), else scores. ``fused`` says why it cannot run."""
    if setting not in RANKING_MODES:
        raise ValueError(f"eval.ranking={setting!r} is not one of {', '.join(RANKING_MODES)}")
    if setting == "scores" or not isinstance(scorer, VectorScorer):
        return "scores"  # popularity has no vectors: it always ranks by scores
    why: str | None
    if beyond:
        why = "needs eval.beyond=false (the beyond-accuracy metrics read top-K lists of the scores)"
    elif torch.device(device).type != "cuda" and not interpreting():
        why = "needs a CUDA GPU"  # known without importing triton
    else:
        from . import rank_kernel

        why = rank_kernel.available(device, scorer.items(torch.device(device)).shape[1])
    if why is None:
        return "fused"
    if setting == "fused":
        raise ValueError(f"eval.ranking=fused {why}; use eval.ranking=auto or scores")
    return "scores"


@torch.no_grad()
def rank_split(
    scorer: Scorer,
    arrs: EvalArrays,
    ds: PreparedDataset,
    history: str = "mask",
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    rows: np.ndarray | None = None,
    beyond: BeyondAccumulator | None = None,
    ranking: str = "scores",
) -> SplitRanks:
    """Rank each target among all items (padding never a candidate), in the order of ``rows``
    (default: every row).

    ``history`` is ``mask`` (every item of the user's history is removed from the candidates,
    the target too when it is a repeat: such a target counts as a miss) or ``keep`` (nothing
    is removed); what is masked is read from the history alone, never from the target. A NaN
    candidate counts as outranking the target; a target whose own score is not finite gets the
    worst rank and is flagged. Batches take the rows shortest first, so each is padded only to
    its own longest sequence (on a CPU the model runs on chunks of :data:`FORWARD_TOKENS_CPU` padded
    positions); a scorer sees the batch's row indices in ``batch.rows``.
    ``beyond`` counts each batch's masked top-K lists (beyond-accuracy metrics). ``ranking``
    ``fused`` (resolved by :func:`resolve_ranking`) ranks a :class:`VectorScorer`'s vectors
    without writing scores (:mod:`fuxi_mme.eval.rank_kernel`; the whole batch in one forward pass),
    ``scores`` writes each batch's scores."""
    if history not in ("mask", "keep"):
        raise ValueError(f"history={history!r}: resolve eval.history first (mask or keep)")
    fused = ranking == "fused"
    vectors = scorer if isinstance(scorer, VectorScorer) else None
    if fused and (beyond is not None or vectors is None):
        raise ValueError("fused ranking takes a model's vectors and no beyond-accuracy counts: resolve eval.ranking first")
    batch_size = batch_size if fused else score_batch(batch_size, ds.num_items)
    rows_all = np.arange(len(arrs)) if rows is None else np.asarray(rows)
    order = np.argsort(arrs.lengths[rows_all], kind="stable")
    out = SplitRanks(np.zeros(len(rows_all), np.int64), np.zeros(len(rows_all), bool), np.zeros(len(rows_all), bool))
    ild = []
    t0 = time.perf_counter()
    starts = range(0, len(order), batch_size)
    if fused and vectors is not None:  # the next batch is gathered on the host while this one is ranked
        from .rank_kernel import fused_ranks  # imports triton: only when it ranks

        jobs = [(arrs, ds, rows_all[order[s : s + batch_size]], history, device) for s in starts]
        for s, (batch, hist) in zip(starts, _ahead(_fused_inputs, jobs)):
            _progress(s, batch_size, len(order), t0, ranking)
            _store(out, order[s : s + batch_size], *fused_ranks(vectors.users(batch), vectors.items(batch.ids.device), batch.target, hist))
        return out
    for s in starts:
        _progress(s, batch_size, len(order), t0, ranking)
        at = order[s : s + batch_size]
        rows_b = rows_all[at]
        scores, tgt = _score_rows(scorer, arrs, rows_b, device)
        ranks, masked, bad, part = score_ranks(scores, tgt, _masked_pairs(arrs, rows_b, ds, history, scores.device), beyond)
        _store(out, at, ranks, masked, bad)
        if part is not None:
            ild.append(part)
    if ild:
        out.ild = torch.stack(ild).cpu().numpy()
    return out


def score_ranks(
    scores_BI: torch.Tensor,
    target_B: torch.Tensor,
    history: tuple[torch.Tensor, torch.Tensor] | None = None,
    beyond: BeyondAccumulator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]:
    """(ranks, masked, nonfinite, diversity sums or None) of a batch's written scores
    (``eval.ranking=scores``), as :func:`rank_split` describes them: padding and the
    ``history`` (row, item) pairs are masked in place, then ``beyond`` counts the top-K lists."""
    bad = ~torch.isfinite(scores_BI.gather(1, target_B[:, None])[:, 0])
    scores_BI[:, 0] = -torch.inf
    if history is not None:
        scores_BI[history[0], history[1]] = -torch.inf
    masked = torch.isneginf(scores_BI.gather(1, target_B[:, None])[:, 0]) & ~bad
    part = beyond.add(scores_BI) if beyond is not None else None
    ranks = ranks_from_scores(scores_BI, target_B)
    return torch.where(masked | bad, torch.full_like(ranks, scores_BI.shape[1]), ranks), masked, bad, part


def _store(out: SplitRanks, at: np.ndarray, ranks: torch.Tensor, masked: torch.Tensor, bad: torch.Tensor) -> None:
    """A batch's results into ``out`` at ``at``: one copy to the host."""
    host = torch.stack([ranks, masked.long(), bad.long()]).cpu().numpy()
    out.ranks[at], out.masked_target[at], out.nonfinite[at] = host[0], host[1].astype(bool), host[2].astype(bool)


def _progress(s: int, batch_size: int, n: int, t0: float, ranking: str) -> None:
    if s and (s // batch_size) % PROGRESS_EVERY == 0:
        log.debug("ranked %d of %d users in %.1f s (%s)", s, n, time.perf_counter() - t0, ranking)


def _masked_pairs(
    arrs: EvalArrays, rows: np.ndarray, ds: PreparedDataset, history: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Under ``mask``, the (row-in-batch, item) pairs of ``rows``' histories on ``device``."""
    if history != "mask":
        return None
    r, it = history_pairs(arrs, rows, ds)
    return torch.from_numpy(r).to(device), torch.from_numpy(it).to(device)


def _fused_inputs(
    arrs: EvalArrays, ds: PreparedDataset, rows: np.ndarray, history: str, device: torch.device | str
) -> tuple[Batch, tuple[torch.Tensor, torch.Tensor] | None]:
    """The batch of ``rows`` and its masked history pairs (:func:`_masked_pairs`), on ``device``."""
    batch = make_batch(arrs, rows, device)
    return batch, _masked_pairs(arrs, rows, ds, history, batch.ids.device)


def _ahead(fn: Callable[..., Any], jobs: list[tuple]) -> Iterator[Any]:
    """``fn(*job)`` for each job, in order; the next job runs in a thread while the caller
    works on the current result (host gathering overlaps the GPU's ranking)."""
    if not jobs:
        return
    with ThreadPoolExecutor(1) as pool:
        nxt = pool.submit(fn, *jobs[0])
        for i in range(len(jobs)):
            cur = nxt.result()
            if i + 1 < len(jobs):
                nxt = pool.submit(fn, *jobs[i + 1])
            yield cur


def _score_rows(scorer: Scorer, arrs: EvalArrays, rows: np.ndarray, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores (rows x items, fp32), targets) of length-sorted ``rows``; on a CPU the scorer runs
    on chunks of :data:`FORWARD_TOKENS_CPU` padded positions, their scores written into one
    tensor (no second copy)."""
    cpu = torch.device(device).type == "cpu"
    chunks = forward_chunks(arrs.lengths[rows], FORWARD_TOKENS_CPU) if cpu else [slice(0, len(rows))]
    batch = make_batch(arrs, rows[chunks[0]], device)
    first = scorer(batch).float()
    if len(chunks) == 1:
        return first, batch.target
    scores = first.new_empty((len(rows), first.shape[1]))
    scores[chunks[0]] = first
    targets = [batch.target]
    for c in chunks[1:]:
        batch = make_batch(arrs, rows[c], device)
        scores[c] = scorer(batch)
        targets.append(batch.target)
    return scores, torch.cat(targets)


def evaluate_ranks(
    scorer: Scorer,
    arrs: EvalArrays,
    ds: PreparedDataset,
    history: str = "mask",
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    rows: np.ndarray | None = None,
) -> np.ndarray:
    """The ranks of :func:`rank_split` alone."""
    return rank_split(scorer, arrs, ds, history, batch_size, device, rows).ranks


Gather = Callable[[object], list]  # every rank's object, in rank order (torch.distributed)


def evaluate_split(
    scorer: Scorer,
    arrs: EvalArrays,
    ds: PreparedDataset,
    *,
    split: str,
    history: str,
    ks: tuple[int, ...] = (10, 50, 200),
    batch_size: int = 1024,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    gather: Gather | None = None,
    protocol: str | None = None,
    beyond: bool = True,
    ranking: str = "auto",
) -> dict[str, Any]:
    """Metrics of one split: HR/NDCG@K and MRR over its users, ``users``, and where the split
    has targets that repeat an item of the user's history, the same metrics on those targets
    and on new-item targets (``repeat_targets`` / ``new_targets``; split after scoring, so it
    never influences a rank) and, under ``mask``, how many repeat targets were masked;
    ``buckets`` holds the same metrics per history-length bucket (:mod:`fuxi_mme.eval.buckets`).

    With ``beyond``, ``beyond`` holds the beyond-accuracy metrics of the same top-K lists
    (:mod:`fuxi_mme.eval.beyond`), popularity read from the training part of ``protocol``
    (without one: each evaluated user's events before its target).

    Training-time validation, ``evaluate``, the popularity baseline, experiments and
    distributed evaluation all come here. With ``world`` > 1, rank r scores the length-sorted
    batches b with b % world == r (the batches one process makes) and ``gather`` collects them,
    so the ranks equal one process's (item counts are summed over ranks, diversity sums taken
    in batch order: the beyond-accuracy metrics equal one process's too). Raises :class:`NonFiniteScores` naming the split when any
    target's score is NaN or infinite. ``ranking``: ``eval.ranking`` (:func:`resolve_ranking`)."""
    ranking = resolve_ranking(ranking, scorer, device, beyond)
    acc, ild_note = _accumulator(ds, ks, device) if beyond else (None, "")
    batch_size = batch_size if ranking == "fused" else score_batch(batch_size, ds.num_items)
    if world > 1:
        by_length = np.argsort(arrs.lengths, kind="stable")
        starts = range(rank * batch_size, len(arrs), world * batch_size)
        mine = {s: rank_split(scorer, arrs, ds, history, batch_size, device, by_length[s : s + batch_size], acc, ranking) for s in starts}
        parts: dict[int, SplitRanks] = {}
        counts: list[np.ndarray] = []
        here = (mine, acc.counts() if acc is not None else None)
        for got, got_counts in gather(here) if gather is not None else [here]:
            parts.update(got)
            if got_counts is not None:
                counts.append(got_counts)
        res = SplitRanks(np.zeros(len(arrs), np.int64), np.zeros(len(arrs), bool), np.zeros(len(arrs), bool))
        if parts:
            for field in ("ranks", "masked_target", "nonfinite"):
                getattr(res, field)[by_length] = np.concatenate([getattr(parts[s], field) for s in sorted(parts)])
            ilds = [a for a in (parts[s].ild for s in sorted(parts)) if a is not None]
            res.ild = np.concatenate(ilds) if ilds else None
        total = np.sum(counts, axis=0) if counts else None
    else:
        res = rank_split(scorer, arrs, ds, history, batch_size, device, beyond=acc, ranking=ranking)
        total = acc.counts() if acc is not None else None
    if res.nonfinite.any():
        raise NonFiniteScores(
            f"{split}: {int(res.nonfinite.sum()):,} of {len(res.ranks):,} users' targets have a NaN or infinite score; "
            "the model's weights or outputs are not finite (diverged training or a damaged checkpoint), so no metric is reported"
        )
    m: dict[str, Any] = metrics_from_ranks(res.ranks, ks)
    m["users"] = int(len(res.ranks))
    m["buckets"] = bucket_metrics(res.ranks, arrs.hist_end - arrs.hist_start, ks)  # by history length (eval/buckets.py)
    repeat = repeat_flags(ds)[arrs.hist_end]
    if repeat.any():
        m["repeat_targets"] = {"users": int(repeat.sum()), **metrics_from_ranks(res.ranks[repeat], ks)}
        if history == "mask":
            m["repeat_targets"]["masked"] = int(res.masked_target.sum())
        if not repeat.all():
            m["new_targets"] = {"users": int((~repeat).sum()), **metrics_from_ranks(res.ranks[~repeat], ks)}
    if acc is not None and total is not None:
        pop = popularity_cached(ds, protocol, arrs.hist_end, arrs.users)
        ild = res.ild.sum(0) if res.ild is not None else None
        m["beyond"] = beyond_metrics(total, acc.ks, pop, ild, ild_note)
    return m


def evaluate_run_split(
    scorer: Scorer, arrs: EvalArrays, ds: PreparedDataset, cfg: Any, split: str, history: str, device: torch.device | str, **dist: Any
) -> dict[str, Any]:
    """:func:`evaluate_split` with a run config's evaluation settings (``eval.ks``, batch size,
    ``beyond``; the protocol whose training part gives popularity); ``dist``: rank, world, gather."""
    e = cfg.eval
    kw: dict[str, Any] = {"ks": e.ks, "batch_size": e.batch_size, "protocol": cfg.data.protocol, "beyond": e.beyond, "ranking": e.ranking}
    return evaluate_split(scorer, arrs, ds, split=split, history=history, device=device, **kw, **dist)


def _accumulator(ds: PreparedDataset, ks: tuple[int, ...], device: torch.device | str) -> tuple[BeyondAccumulator, str]:
    """The beyond-accuracy counters for ``ds`` on ``device``, and why ILD is skipped (no item features)."""
    from ..data.features import item_features

    feats, why = item_features(ds)
    acc = BeyondAccumulator(ks, ds.num_items, feats.matrix if feats is not None else None, device)
    return acc, (f"ILD skipped: {why}" if feats is None else "")

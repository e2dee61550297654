"""Robustness protocols: noise and sparsity in the training part of each sequence.

docs/training.md#robustness-protocols. A perturbed view is a :class:`PreparedDataset` with the
same users, item ids and targets: each user's sequence is its perturbed training part followed
by its untouched held-out events (the validation and test targets under ``loo-val``, the test
target under ``paper``), so :func:`~fuxi_mme.data.splits.split_points` finds the same targets
and no held-out event ever enters the training part. The view is computed after the clean
dataset is loaded from its cache (cheap, per run; the prepared cache holds the clean data only),
from ``train.seed`` alone, on every process alike: the same view whatever the number of ranks.

Order: sparsity first (``last_k`` keeps each user's last k training events, ``drop`` removes
each training event with probability ``rate``), then noise on what remains:

* ``insert``: after each training event, with probability ``rate``, a random item with the
  event's timestamp;
* ``replace``: each training event's item, with probability ``rate``, becomes a random item
  (timestamp kept);
* ``shuffle``: each user's training part is cut into windows of ``window`` consecutive events
  from its start; each window's items, with probability ``rate``, are permuted at random (the
  timestamps stay in place, so the sequence stays chronological).

Random items are uniform over the catalogue or drawn in proportion to the item counts of the
clean training parts (``popularity``; held-out targets are never counted).
"""

from __future__ import annotations

import numpy as np

from ..config import DataConfig, NoiseConfig, SparsityConfig
from .prepared import PreparedDataset, compute_stats, flat_ranges
from .splits import split_points

NOISE_STREAM = 0x6E6F69  # separates these draws from any other use of train.seed


def is_perturbed(cfg: DataConfig) -> bool:
    return cfg.noise.kind != "none" or cfg.sparsity.kind != "none"


def training_view(ds: PreparedDataset, cfg: DataConfig, seed: int) -> PreparedDataset:
    """The dataset training reads: sparsity and noise applied to the training parts (``ds`` itself when both are off)."""
    return perturb(ds, cfg.protocol, cfg.noise, cfg.sparsity, seed)


def evaluation_view(ds: PreparedDataset, cfg: DataConfig, seed: int) -> PreparedDataset:
    """The dataset evaluation reads: the clean ``ds``, or with ``data.noise.eval`` the histories
    with the same noise (no sparsity: evaluation users and histories stay whole)."""
    if not cfg.noise.eval or cfg.noise.kind == "none":
        return ds
    if cfg.sparsity.kind == "none":
        return training_view(ds, cfg, seed)
    return perturb(ds, cfg.protocol, cfg.noise, SparsityConfig(), seed)


def perturb(ds: PreparedDataset, protocol: str, noise: NoiseConfig, sparsity: SparsityConfig, seed: int) -> PreparedDataset:
    """Sparsity then noise on every user's training part; held-out events unchanged."""
    if noise.kind == "none" and sparsity.kind == "none":
        return ds
    rng = np.random.default_rng([seed, NOISE_STREAM])
    U = ds.num_users
    user = np.repeat(np.arange(U), ds.lengths)
    train_end = split_points(ds, protocol)["train_end"]
    train = np.arange(len(ds.items)) < train_end[user]
    items, ts = ds.items.copy(), ds.timestamps.copy()
    beh = ds.behaviors  # an event's behaviour travels with it; a shuffle moves items, not behaviours or times
    keep = _sparsity_keep(ds, sparsity, user, train, train_end, rng)
    if keep is not None:
        items, ts, user, train = items[keep], ts[keep], user[keep], train[keep]
        beh = beh[keep] if beh is not None else None
    draw = _item_drawer(ds, protocol, noise.sampling, rng)
    if noise.kind == "replace":
        hit = train & (rng.random(len(items)) < noise.rate)
        items[hit] = draw(int(hit.sum()))
    elif noise.kind == "insert":
        hit = train & (rng.random(len(items)) < noise.rate)
        src = np.repeat(np.arange(len(items)), 1 + hit)
        added = np.zeros(len(src), dtype=bool)
        added[1:] = src[1:] == src[:-1]  # the second copy of an event is the inserted one
        items, ts, user, train = items[src], ts[src], user[src], train[src]
        beh = beh[src] if beh is not None else None  # an inserted item takes its neighbour's behaviour
        items[added] = draw(int(added.sum()))
    elif noise.kind == "shuffle":
        items = _shuffle_windows(items, user, train, U, noise, rng)
    offsets = np.zeros(U + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=U), out=offsets[1:])
    out = PreparedDataset(
        name=ds.name,
        offsets=offsets,
        items=items,
        timestamps=ts,
        item_raw=ds.item_raw,
        user_raw=ds.user_raw,
        has_timestamps=ds.has_timestamps,
        item_titles=ds.item_titles,
        cache_dir=ds.cache_dir,  # same item ids: cached item features still apply
        behaviors=beh,
        behavior_names=ds.behavior_names,
        target_behavior=ds.target_behavior,
    )
    out.stats = compute_stats(out)
    out.stats["perturbation"] = {"noise": vars(noise).copy(), "sparsity": vars(sparsity).copy(), "seed": seed}
    return out


def _sparsity_keep(ds, sparsity: SparsityConfig, user, train, train_end, rng) -> np.ndarray | None:
    """(nnz,) bool: the events kept (every held-out event is), or None for all."""
    if sparsity.kind == "last_k":
        return ~train | (np.arange(len(ds.items)) >= train_end[user] - sparsity.k)
    if sparsity.kind == "drop":
        return ~train | (rng.random(len(ds.items)) >= sparsity.rate)
    return None


def _item_drawer(ds: PreparedDataset, protocol: str, sampling: str, rng):
    """n -> (n,) random item ids in 1..num_items, uniform or by clean training counts."""
    if sampling == "popularity":
        idx = flat_ranges(ds.offsets[:-1], split_points(ds, protocol)["train_end"])
        counts = np.bincount(ds.items[idx], minlength=ds.num_items + 1).astype(np.float64)
        counts[0] = 0.0
        p = counts / counts.sum()
        return lambda n: rng.choice(ds.num_items + 1, size=n, p=p).astype(np.int64)
    return lambda n: rng.integers(1, ds.num_items + 1, size=n, dtype=np.int64)


def _shuffle_windows(items, user, train, U: int, noise: NoiseConfig, rng) -> np.ndarray:
    """Items permuted inside the chosen windows of each user's training part."""
    n = len(items)
    first = np.zeros(U + 1, dtype=np.int64)
    np.cumsum(np.bincount(user, minlength=U), out=first[1:])
    pos = np.arange(n) - first[user]  # position in the user's sequence
    win = pos // noise.window
    # held-out events form windows of their own that are never shuffled
    win = np.where(train, win, n + pos)
    wid = np.unique(user * (2 * n + 1) + win, return_inverse=True)[1]
    shuffled = (rng.random(int(wid.max()) + 1 if n else 0) < noise.rate)[wid] & train
    order_key = np.where(shuffled, rng.random(n), pos.astype(np.float64))
    perm = np.lexsort((order_key, wid))  # wid increases along the flat array: groups stay in place
    return items[perm]

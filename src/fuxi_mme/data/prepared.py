"""Prepared datasets: contiguous ids, chronological per-user sequences, statistics, disk cache.

A prepared dataset stores all users' sequences in CSR form (``offsets`` into flat ``items`` and
``timestamps`` arrays). Item ids are contiguous ``1..num_items`` (0 is padding), assigned in
sorted order of the raw ids; ``item_raw[i]`` maps back. The cache lives under
``<data_dir>/prepared/<name>-<key>/`` where ``key`` hashes the source fingerprint and every
option that changes the result, so it is rebuilt exactly when those change. It is written to
a temporary folder with a ``checksums.json`` and renamed into place, so an interrupted run never
leaves half a cache; a cache that fails its checksums or any reader is rebuilt and replaced.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..utils.integrity import verify_manifest, write_manifest
from ..utils.runinfo import temp_dir_beside
from .behaviors import encode as encode_behaviors
from .table import DataError

PREP_VERSION = 2  # 2: timestamps in milliseconds read as seconds (data/table.millis_to_seconds)


def default_data_dir() -> Path:
    env = os.environ.get("FUXI_MME_DATA")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fuxi-mme"


@dataclass
class PreparedDataset:
    name: str
    offsets: np.ndarray  # (U+1,) int64
    items: np.ndarray  # (nnz,) int64 in 1..num_items
    timestamps: np.ndarray  # (nnz,) int64 (zeros when has_timestamps is False)
    item_raw: np.ndarray  # (num_items + 1,) raw item ids; index 0 is the padding slot
    user_raw: np.ndarray  # (U,) raw user ids
    has_timestamps: bool
    stats: dict[str, Any] = field(default_factory=dict)
    item_titles: list[str] | None = None  # (num_items + 1,) when the source has titles
    cache_dir: str | None = None
    # behaviours (docs/datasets.md#behaviours): (nnz,) int8 codes 1..B of ``behavior_names``
    behaviors: np.ndarray | None = None
    behavior_names: list[str] | None = None
    # data.target_behavior of the run using this dataset (not cached): the splits read it
    target_behavior: str | None = None

    @property
    def num_users(self) -> int:
        return len(self.offsets) - 1

    @property
    def num_items(self) -> int:
        return len(self.item_raw) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def sequence(self, u: int) -> tuple[np.ndarray, np.ndarray]:
        s, e = self.offsets[u], self.offsets[u + 1]
        return self.items[s:e], self.timestamps[s:e]

    def item_index(self) -> dict[Any, int]:
        """Raw item id -> contiguous id (for inference on raw ids)."""
        return {k: i for i, k in enumerate(self.item_raw.tolist()) if i > 0}


def flat_ranges(start: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(start[i], end[i])`` over i, vectorised (empty ranges allowed)."""
    lens = np.maximum(end - start, 0)
    first = np.concatenate([[0], np.cumsum(lens)[:-1]])
    return np.arange(int(lens.sum())) + np.repeat(start - first, lens)


def range_blocks(start: np.ndarray, end: np.ndarray, events: int = 1 << 26):
    """:func:`flat_ranges` of ``start``/``end`` in pieces of whole users holding about ``events``
    indices each, so a pass over the training part of a large log never builds one index of
    every event (yields each piece's flat indices)."""
    lens = np.maximum(end - start, 0)
    cum = np.cumsum(lens)
    lo = 0
    while lo < len(start):
        done = int(cum[lo - 1]) if lo else 0
        hi = max(lo + 1, int(np.searchsorted(cum, done + events, side="right")))
        yield flat_ranges(start[lo:hi], end[lo:hi])
        lo = hi


def order_interactions(df: pd.DataFrame, ordering: str) -> pd.DataFrame:
    """Sort by user then time. ``stable`` keeps file order among equal timestamps.

    ``hstu`` imitates the published HSTU preprocessing, which groups by user after pandas'
    default (unstable quicksort) sort and so shuffles ties arbitrarily; we reproduce the
    *kind* of ordering (quicksort on timestamp) rather than a bit-exact copy.
    """
    if ordering == "stable":
        idx = np.lexsort((np.arange(len(df)), df["timestamp"].to_numpy(), _codes(df["user"])))
    elif ordering == "hstu":
        by_user = df.sort_values("user", kind="quicksort")
        inner = by_user.groupby("user", sort=True, group_keys=False)["timestamp"].apply(lambda s: s.sort_values(kind="quicksort"))
        return df.loc[inner.index].reset_index(drop=True)
    else:
        raise DataError(f"unknown ordering {ordering!r}; use 'stable' or 'hstu'")
    return df.iloc[idx].reset_index(drop=True)


def _codes(col: pd.Series) -> np.ndarray:
    # Sort users by raw id (numeric ids numerically, strings lexically).
    return pd.factorize(col, sort=True)[0]


def build_prepared(
    df: pd.DataFrame,
    name: str,
    ordering: str = "stable",
    min_user_interactions: int = 2,
    min_rating: float | None = None,
    has_timestamps: bool = True,
    item_titles: dict[Any, str] | None = None,
    source: str = "",
) -> tuple[PreparedDataset, list[str]]:
    """Canonical table -> PreparedDataset. Returns the dataset and human-readable notes."""
    notes: list[str] = []
    if min_rating is not None:
        if "rating" not in df.columns:
            raise DataError(f"{source}: data.min_rating is set but there is no rating column (set data.rating_col)")
        before = len(df)
        df = df[df["rating"] >= min_rating]
        notes.append(f"kept {len(df):,} of {before:,} interactions with rating >= {min_rating}")
    counts = df.groupby("user", sort=False)["item"].transform("size")
    short = counts < min_user_interactions
    if short.any():
        dropped_users = df.loc[short, "user"].nunique()
        notes.append(f"dropped {dropped_users:,} user(s) with fewer than {min_user_interactions} interactions ({int(short.sum()):,} interactions)")
        df = df[~short]
    if len(df) == 0:
        raise DataError(
            f"{source}: no user has at least {min_user_interactions} interactions after filtering; "
            "a sequential recommender needs at least 2 per user (check the user column and filters)"
        )
    df = order_interactions(df.reset_index(drop=True), ordering)
    item_raw_sorted, item_codes = np.unique(df["item"].to_numpy(), return_inverse=True)
    user_raw, user_codes = np.unique(df["user"].to_numpy(), return_inverse=True)
    # df is sorted by user code already (np.unique and factorize(sort=True) agree).
    offsets = np.zeros(len(user_raw) + 1, dtype=np.int64)
    np.cumsum(np.bincount(user_codes, minlength=len(user_raw)), out=offsets[1:])
    items = (item_codes + 1).astype(np.int64)
    ts = df["timestamp"].to_numpy().astype(np.int64)
    behaviors, behavior_names = encode_behaviors(df["behavior"], source) if "behavior" in df.columns else (None, None)
    # Slot 0 (padding) repeats the first raw id as a placeholder; item_index() skips it.
    item_raw = np.concatenate([item_raw_sorted[:1], item_raw_sorted])
    titles = None
    if item_titles:
        titles = [""] + [str(item_titles.get(k, "")) for k in item_raw_sorted.tolist()]
    ds = PreparedDataset(
        name=name,
        offsets=offsets,
        items=items,
        timestamps=ts,
        item_raw=item_raw,
        user_raw=user_raw,
        has_timestamps=has_timestamps,
        item_titles=titles,
        behaviors=behaviors,
        behavior_names=behavior_names,
    )
    ds.stats = compute_stats(ds)
    return ds, notes


def compute_stats(ds: PreparedDataset) -> dict[str, Any]:
    lens = ds.lengths
    st: dict[str, Any] = {
        "users": int(ds.num_users),
        "items": int(ds.num_items),
        "interactions": int(len(ds.items)),
        "seq_len_mean": float(lens.mean()),
        "seq_len_percentiles": {str(p): float(np.percentile(lens, p)) for p in (0, 25, 50, 75, 90, 99, 100)},
        "has_timestamps": bool(ds.has_timestamps),
    }
    if ds.has_timestamps and len(ds.timestamps):
        st["time_min"] = int(ds.timestamps.min())
        st["time_max"] = int(ds.timestamps.max())
        st["time_span_days"] = float((st["time_max"] - st["time_min"]) / 86400.0)
    if ds.behaviors is not None and ds.behavior_names is not None:
        per = np.bincount(ds.behaviors.astype(np.int64), minlength=len(ds.behavior_names) + 1)[1:]
        st["behaviors"] = {n: int(c) for n, c in zip(ds.behavior_names, per)}
    return st


# --------------------------------------------------------------------------- cache


def cache_key(parts: dict[str, Any]) -> str:
    blob = json.dumps({"v": PREP_VERSION, **parts}, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def same_version(recorded: dict[str, Any], now: dict[str, Any]) -> bool:
    """Two :func:`file_fingerprint` readings are of the same version of the data (sizes and
    modification times; the path aside, so a moved file is still the same)."""
    return {k: v for k, v in recorded.items() if k != "path"} == {k: v for k, v in now.items() if k != "path"}


def source_changed(info: dict[str, Any] | None, now: dict[str, Any] | None) -> bool:
    """A run's ``run.json`` (``info``) recorded the file it trained on (``source``) and ``now``,
    the file's :func:`file_fingerprint` today, is another version of it; False where either is
    missing (nothing to compare)."""
    was = (info or {}).get("source")
    return bool(was) and now is not None and not same_version(was or {}, now)


def file_fingerprint(path: str | Path) -> dict[str, Any]:
    p = Path(path).resolve()
    if p.is_dir():
        return {"path": str(p), "files": sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in p.iterdir() if f.is_file())}
    st = p.stat()
    return {"path": str(p), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


STALE_SECONDS = 3600  # a temporary cache folder this old was left by a killed build


def _remove_stale(target: Path) -> None:
    """Temporary and replaced folders of ``target`` that a killed build left behind (recent
    ones may belong to a build running in another process)."""
    for p in [*target.parent.glob(f".{target.name}.tmp-*"), *target.parent.glob(f".{target.name}.old-*")]:
        try:
            if time.time() - p.stat().st_mtime > STALE_SECONDS:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def save_prepared(ds: PreparedDataset, target: Path, meta: dict[str, Any], replace: bool = False) -> None:
    """Write atomically: a temporary sibling folder with checksums, then one rename; with
    ``replace``, an existing (damaged or outdated) ``target`` is renamed away first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(target)
    tmp = temp_dir_beside(target)
    try:
        arrays: dict[str, np.ndarray] = {"offsets": ds.offsets, "items": ds.items, "timestamps": ds.timestamps}
        if ds.behaviors is not None:
            arrays["behaviors"] = ds.behaviors
        np.savez(tmp / "sequences.npz", **arrays)  # type: ignore[arg-type]
        pd.DataFrame({"raw_id": _as_storable(ds.item_raw)}).to_parquet(tmp / "items.parquet")
        pd.DataFrame({"raw_id": _as_storable(ds.user_raw)}).to_parquet(tmp / "users.parquet")
        if ds.item_titles is not None:
            pd.DataFrame({"title": ds.item_titles}).to_parquet(tmp / "titles.parquet")
        full = {**meta, "name": ds.name, "has_timestamps": ds.has_timestamps, "stats": ds.stats}
        if ds.behavior_names is not None:
            full["behavior_names"] = ds.behavior_names
        (tmp / "meta.json").write_text(json.dumps(full, indent=2, default=str))
        write_manifest(tmp, [f.name for f in tmp.iterdir()])
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        if replace:
            try:
                os.rename(target, old)
            except FileNotFoundError:
                pass
        try:
            os.rename(tmp, target)
        except OSError:
            if (target / "meta.json").exists():  # another process won the race; theirs is identical
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _as_storable(a: np.ndarray) -> np.ndarray:
    return a.astype(str) if a.dtype == object else a


def load_prepared(folder: Path) -> PreparedDataset:
    """Read a cache folder. Raises whatever its readers raise on a damaged file (and
    :class:`DataError` on a checksum or consistency failure): the caller rebuilds it."""
    verify_manifest(folder)
    meta = json.loads((folder / "meta.json").read_text())
    with np.load(folder / "sequences.npz") as z:
        offsets, items, ts = z["offsets"], z["items"], z["timestamps"]
        behaviors = z["behaviors"] if "behaviors" in z.files else None
    item_raw = pd.read_parquet(folder / "items.parquet")["raw_id"].to_numpy()
    user_raw = pd.read_parquet(folder / "users.parquet")["raw_id"].to_numpy()
    titles = None
    if (folder / "titles.parquet").exists():
        titles = pd.read_parquet(folder / "titles.parquet")["title"].tolist()
    ds = PreparedDataset(
        name=meta["name"],
        offsets=offsets,
        items=items,
        timestamps=ts,
        item_raw=item_raw,
        user_raw=user_raw,
        has_timestamps=bool(meta["has_timestamps"]),
        stats=meta["stats"],
        item_titles=titles,
        cache_dir=str(folder),
        behaviors=behaviors,
        behavior_names=meta.get("behavior_names"),
    )
    _check_consistent(ds, folder)
    return ds


def _check_consistent(ds: PreparedDataset, folder: Path) -> None:
    """Shapes and id ranges agree (catches damage in a cache written without checksums)."""
    n, U = len(ds.items), ds.num_users
    ok = (
        U >= 0
        and len(ds.user_raw) == U
        and ds.offsets[0] == 0
        and ds.offsets[-1] == n
        and len(ds.timestamps) == n
        and bool(np.all(np.diff(ds.offsets) >= 0))
        and (n == 0 or (ds.items.min() >= 1 and ds.items.max() <= ds.num_items))
        and (ds.item_titles is None or len(ds.item_titles) == ds.num_items + 1)
        and (ds.behaviors is None or (len(ds.behaviors) == n and ds.behavior_names is not None))
        and ds.stats.get("users") == U
        and ds.stats.get("interactions") == n
    )
    if not ok:
        raise DataError(f"cached dataset {folder} is inconsistent (sequence offsets, ids or statistics disagree)")

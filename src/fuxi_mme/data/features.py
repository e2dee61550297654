"""Categorical item features, mapped to prepared item ids: what intra-list diversity compares
(docs/training.md#beyond-accuracy-metrics).

* MovieLens genres: ``movies.dat`` (ML-1M and ML-1M-ts70, ``MovieID::Title::Genre|Genre``),
  ``u.item`` (ML-100K, 19 genre flags; ``unknown`` is no genre) and ``movies.csv`` (ML-20M;
  ``(no genres listed)`` is none), read from the folder the dataset was prepared from (its
  prepared cache's ``meta.json`` records it);
* the demo's facets: genre (8) and style (4) of :func:`fuxi_mme.data.demo.item_catalogue`, so
  every demo item has exactly two features.

Read lazily, on the first evaluation that asks, and kept on the dataset object (a few
milliseconds for MovieLens); nothing is written to the cache. Other datasets have none:
:func:`item_features` returns None with the reason.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from . import demo
from .prepared import PreparedDataset
from .table import DataError

# ML-100K's u.genre, in flag order (used when u.genre is absent)
ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama", "Fantasy",
    "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip


@dataclass
class ItemFeatures:
    """A multi-hot item x feature matrix over the prepared ids (row 0, padding, has none)."""

    names: list[str]  # (F,)
    matrix: np.ndarray  # (num_items + 1, F) bool
    source: str  # where they were read, for notes

    @property
    def covered(self) -> int:
        """How many items have at least one feature."""
        return int(self.matrix[1:].any(1).sum())


def _multi_hot(ds: PreparedDataset, raw_sets: dict[Any, list[str]], source: str, names: list[str] | None = None) -> ItemFeatures:
    """Raw item id -> feature names, as a matrix over ``ds``'s ids (an item the file lacks has none)."""
    names = names or sorted({f for fs in raw_sets.values() for f in fs})
    col = {n: j for j, n in enumerate(names)}
    m = np.zeros((ds.num_items + 1, len(names)), dtype=bool)
    for i, raw in enumerate(ds.item_raw.tolist()):
        if i == 0:
            continue
        for f in raw_sets.get(raw, raw_sets.get(str(raw), ())):
            if f in col:
                m[i, col[f]] = True
    return ItemFeatures(names, m, source)


def _text(path: Path) -> str:
    from .sources import _decode_titles  # the MovieLens metadata's encoding rule

    return _decode_titles(path)


def _ml_dat(path: Path) -> dict[Any, list[str]]:
    out: dict[Any, list[str]] = {}
    for line in _text(path).splitlines():
        parts = line.split("::")
        if len(parts) >= 3 and parts[0].strip().isdigit():
            out[int(parts[0])] = [g for g in parts[2].strip().split("|") if g]
    return out


def _ml_100k(path: Path) -> dict[Any, list[str]]:
    genres = list(ML100K_GENRES)
    gfile = path.parent / "u.genre"
    if gfile.is_file():
        pairs = [ln.rsplit("|", 1) for ln in _text(gfile).splitlines() if "|" in ln]
        genres = [name for name, _ in sorted(pairs, key=lambda p: int(p[1]))]
    out: dict[Any, list[str]] = {}
    for line in _text(path).splitlines():
        parts = line.split("|")
        if len(parts) >= 5 + len(genres) and parts[0].strip().isdigit():
            flags = parts[-len(genres) :]
            out[int(parts[0])] = [g for g, f in zip(genres, flags) if f.strip() == "1" and g != "unknown"]
    return out


def _ml_csv(path: Path) -> dict[Any, list[str]]:
    m = pd.read_csv(io.StringIO(_text(path)))
    if not {"movieId", "genres"} <= set(m.columns):
        raise DataError(f"{path} lacks the movieId and genres columns")
    return {int(i): [g for g in str(gs).split("|") if g and g != "(no genres listed)"] for i, gs in zip(m["movieId"], m["genres"])}


# dataset name -> (metadata file name, reader)
MOVIELENS: dict[str, tuple[str, Callable[[Path], dict[Any, list[str]]]]] = {
    "ml-100k": ("u.item", _ml_100k),
    "ml-1m": ("movies.dat", _ml_dat),
    "ml-1m-ts70": ("movies.dat", _ml_dat),
    "ml-20m": ("movies.csv", _ml_csv),
}


def source_path(ds: PreparedDataset) -> Path | None:
    """The file or folder ``ds`` was prepared from, as its cache's ``meta.json`` records it."""
    if not ds.cache_dir:
        return None
    try:
        meta = json.loads((Path(ds.cache_dir) / "meta.json").read_text())
        return Path(meta["parts"]["source"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _demo(ds: PreparedDataset) -> ItemFeatures:
    cat = demo.item_catalogue()
    sets = {int(i): [f"genre {g}", f"style {s}"] for i, g, s in zip(cat["item"], cat["genre"], cat["style"])}
    names = [f"genre {g}" for g in range(demo.NUM_GENRES)] + [f"style {s}" for s in range(demo.NUM_STYLES)]
    return _multi_hot(ds, sets, "the demo's facets (genre, style)", names)


def _read(ds: PreparedDataset) -> tuple[ItemFeatures | None, str]:
    if ds.name == "demo":
        return _demo(ds), ""
    if ds.name not in MOVIELENS:
        return None, f"{ds.name} has no categorical item features we read (MovieLens genres and the demo's facets only)"
    fname, reader = MOVIELENS[ds.name]
    src = source_path(ds)
    if src is None:
        return None, f"{ds.name}: the folder it was prepared from is not recorded, so {fname} (genres) was not found"
    from .sources import _find

    try:
        f = _find(src.parent if src.is_file() else src, [fname], f"{ds.name} item genres")
        feats = _multi_hot(ds, reader(f), f"{f.name} genres ({f})")
    except (DataError, OSError, ValueError) as exc:
        return None, f"{ds.name}: no genres read ({str(exc).splitlines()[0]})"
    if feats.covered == 0:
        return None, f"{ds.name}: {f} gives none of its items a genre"
    return feats, ""


def item_features(ds: PreparedDataset) -> tuple[ItemFeatures | None, str]:
    """``ds``'s categorical item features, or None and why; read once per dataset object."""
    got = ds.__dict__.get("_item_features")
    if got is None or (got[0] is not None and len(got[0].matrix) != ds.num_items + 1):
        got = ds.__dict__["_item_features"] = _read(ds)
    return got

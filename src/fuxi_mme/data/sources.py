"""Named datasets and how each is read into the canonical table.

Each :class:`Source` knows where its files come from, how to parse them, whether they carry
timestamps, and the statistics published for it (a mismatch after preparation is a loud
warning naming the expected numbers). ``file`` is the generic loader for user files.
"""

from __future__ import annotations

import gzip
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from . import demo
from .table import DataError, canonicalize, load_user_file


@dataclass
class Source:
    name: str
    description: str
    read: Callable[[Path | None, Any], tuple[pd.DataFrame, dict[Any, str] | None]]
    has_timestamps: bool = True
    needs_files: bool = True
    expected: dict[str, int] = field(default_factory=dict)  # users/items/interactions
    files_hint: str = ""
    licence: str = ""


def _open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(f"{path} is not a valid gzip file ({exc}); download it again") from exc
    try:
        return io.StringIO(raw.decode(encoding))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not {encoding} text ({exc})") from exc


def _find(folder: Path, names: list[str], what: str) -> Path:
    if folder.is_file():
        return folder
    for n in names:
        if (folder / n).is_file():
            return folder / n
        hits = list(folder.glob(f"*/{n}"))  # an extracted archive's sub-folder
        if hits:
            return hits[0]
    raise DataError(f"{folder} holds none of {', '.join(names)} ({what}); point --data-path at the dataset's files")


def _read_sep_ratings(path: Path, sep: str, cols: list[str]) -> pd.DataFrame:
    text = _open_text(path, "latin-1")
    rows = [line.rstrip("\r\n").split(sep) for line in text if line.strip()]
    bad = [i for i, r in enumerate(rows) if len(r) != len(cols)]
    if bad:
        raise DataError(
            f"{path}: line {bad[0] + 1} has {len(rows[bad[0]])} fields separated by {sep!r}, expected {len(cols)} "
            f"({', '.join(cols)}); is this the right file and separator?"
        )
    df = pd.DataFrame(rows, columns=cols)
    for c in cols:
        num = pd.to_numeric(df[c], errors="coerce")
        if num.isna().any():
            i = int(np.flatnonzero(num.isna().to_numpy())[0])
            raise DataError(f"{path}: line {i + 1}, field {c!r} is not a number ({df[c].iloc[i]!r})")
        df[c] = num
    return df


def _movie_titles(path: Path | None, sep: str) -> dict[Any, str] | None:
    if path is None or not path.is_file():
        return None
    titles = {}
    for line in _open_text(path, "latin-1"):
        parts = line.rstrip("\r\n").split(sep)
        if len(parts) >= 2 and parts[0].strip().isdigit():
            titles[int(parts[0])] = parts[1]
    return titles


def _read_ml100k(path: Path | None, cfg: Any):
    assert path is not None
    f = _find(path, ["u.data"], "MovieLens-100K ratings")
    df = _read_sep_ratings(f, "\t", ["user", "item", "rating", "timestamp"])
    return canonicalize(df, str(f), rating_col="rating"), _movie_titles(f.parent / "u.item", "|")


def _read_ml1m(path: Path | None, cfg: Any, names=("ratings.dat", "ratings.dat.gz")):
    assert path is not None
    f = _find(path, list(names), "MovieLens-1M ratings")
    df = _read_sep_ratings(f, "::", ["user", "item", "rating", "timestamp"])
    return canonicalize(df, str(f), rating_col="rating"), _movie_titles(f.parent / "movies.dat", "::")


def _read_ml1m_ts70(path: Path | None, cfg: Any):
    return _read_ml1m(path, cfg, names=("ratings_timestamped_subset.dat.gz", "ratings_timestamped_subset.dat"))


def _read_ml20m(path: Path | None, cfg: Any):
    assert path is not None
    f = _find(path, ["ratings.csv", "ratings.csv.gz"], "MovieLens-20M ratings")
    df = pd.read_csv(f)
    df = canonicalize(df, str(f), "userId", "movieId", "timestamp", "rating")
    titles = None
    movies = f.parent / "movies.csv"
    if movies.is_file():
        m = pd.read_csv(movies)
        titles = dict(zip(m["movieId"].tolist(), m["title"].tolist()))
    return df, titles


def read_sequence_file(path: Path) -> pd.DataFrame:
    """``user item item ...`` per line (S3-Rec) in chronological order; no timestamps."""
    users, items = [], []
    for n, line in enumerate(_open_text(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) < 2:
            raise DataError(f"{path}: line {n} has a user but no items; expected 'user item item ...'")
        users.extend([parts[0]] * (len(parts) - 1))
        items.extend(parts[1:])
    if not users:
        raise DataError(f"{path} holds no sequences")
    df = pd.DataFrame({"user": users, "item": items})
    for c in ("user", "item"):
        num = pd.to_numeric(df[c], errors="coerce")
        if not num.isna().any():
            df[c] = num.astype(np.int64)
    df["timestamp"] = np.zeros(len(df), dtype=np.int64)
    return df


def _amazon(category_file: str):
    def read(path: Path | None, cfg: Any):
        assert path is not None
        f = _find(path, [category_file, category_file + ".gz"], "Amazon 5-core sequences (S3-Rec format)")
        return read_sequence_file(f), None

    return read


def _read_demo(path: Path | None, cfg: Any):
    cat = demo.item_catalogue()
    return demo.generate(cfg.demo_users, cfg.demo_seed), dict(zip(cat["item"].tolist(), cat["title"].tolist()))


def _read_file(path: Path | None, cfg: Any):
    if path is None:
        raise DataError("dataset 'file' needs a file: pass --data-path FILE (CSV, TSV, Parquet or JSONL)")
    return (
        load_user_file(path, cfg.user_col, cfg.item_col, cfg.time_col, cfg.rating_col, cfg.sep),
        None,
    )


_ML_LICENCE = "GroupLens research licence: no redistribution; download it yourself"
_AMAZON_LICENCE = "Amazon review data (McAuley et al.): research use, no redistribution"

SOURCES: dict[str, Source] = {
    s.name: s
    for s in [
        Source("demo", "built-in synthetic log (facets, order and time gaps carry signal)", _read_demo, needs_files=False, licence="generated; ours (MIT)"),
        Source("file", "your own interactions file (CSV/TSV/Parquet/JSONL; --data-path)", _read_file),
        Source("ml-100k", "MovieLens-100K (u.data)", _read_ml100k, expected={"users": 943, "items": 1682, "interactions": 100000}, files_hint="the extracted ml-100k folder (u.data, u.item)", licence=_ML_LICENCE),
        Source("ml-1m", "MovieLens-1M (ratings.dat)", _read_ml1m, expected={"users": 6040, "items": 3706, "interactions": 1000209}, files_hint="the extracted ml-1m folder (ratings.dat, movies.dat)", licence=_ML_LICENCE),
        Source("ml-1m-ts70", "MovieLens-1M, the 70% of ratings with known timestamps (not the published ML-1M)", _read_ml1m_ts70, expected={"users": 6040, "interactions": 699929}, files_hint="a folder with ratings_timestamped_subset.dat.gz", licence=_ML_LICENCE),
        Source("ml-20m", "MovieLens-20M (ratings.csv)", _read_ml20m, expected={"users": 138493, "items": 26744, "interactions": 20000263}, files_hint="the extracted ml-20m folder (ratings.csv, movies.csv)", licence=_ML_LICENCE),
        Source("amazon-beauty", "Amazon Beauty 5-core, S3-Rec sequences (order only)", _amazon("Beauty.txt"), has_timestamps=False, expected={"users": 22363, "items": 12101, "interactions": 198502}, files_hint="a folder with Beauty.txt", licence=_AMAZON_LICENCE),
        Source("amazon-sports", "Amazon Sports_and_Outdoors 5-core, S3-Rec sequences (order only)", _amazon("Sports_and_Outdoors.txt"), has_timestamps=False, expected={"users": 35598, "items": 18357, "interactions": 296337}, files_hint="a folder with Sports_and_Outdoors.txt", licence=_AMAZON_LICENCE),
        Source("amazon-toys", "Amazon Toys_and_Games 5-core, S3-Rec sequences (order only)", _amazon("Toys_and_Games.txt"), has_timestamps=False, expected={"users": 19412, "items": 11924, "interactions": 167597}, files_hint="a folder with Toys_and_Games.txt", licence=_AMAZON_LICENCE),
    ]
}


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"unknown dataset {name!r}; known: {', '.join(SOURCES)} (or --data-path FILE)")
    return SOURCES[name]

"""Amazon review data and preprocessed sequence files: the readers behind the ``amazon-*``
datasets of ``sources.py`` (raw ratings CSV with k-core filtering, or S3-Rec / SASRec
sequence files, order only)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .table import DataError, canonicalize, open_text


def read_sequence_file(path: Path) -> pd.DataFrame:
    """Preprocessed order-only sequences, in one of the two common layouts:

    * S3-Rec: ``user item item ...`` per line, items in chronological order;
    * SASRec: ``user item`` per line, each user's lines in chronological order.

    The layout is recognised by users repeating over lines (SASRec). No timestamps.
    """
    users, items = [], []
    lines_per_user: dict[str, int] = {}
    for n, line in enumerate(open_text(path), start=1):
        parts = line.split()
        if not parts:
            continue
        if "," in line:
            raise DataError(f"{path}: line {n} contains commas; sequence files are whitespace-separated ('user item ...')")
        if len(parts) < 2:
            raise DataError(f"{path}: line {n} has a user but no items; expected 'user item item ...' (S3-Rec) or 'user item' (SASRec)")
        lines_per_user[parts[0]] = lines_per_user.get(parts[0], 0) + 1
        users.extend([parts[0]] * (len(parts) - 1))
        items.extend(parts[1:])
    if not users:
        raise DataError(f"{path} holds no sequences")
    layout = "sasrec" if any(v > 1 for v in lines_per_user.values()) else "s3rec"
    df = pd.DataFrame({"user": users, "item": items})
    for c in ("user", "item"):
        num = pd.to_numeric(df[c], errors="coerce")
        if not num.isna().any():
            df[c] = num.astype(np.int64)
    df["timestamp"] = np.zeros(len(df), dtype=np.int64)
    df.attrs["has_timestamps"] = False
    df.attrs["layout"] = layout
    return df


def k_core(df: pd.DataFrame, k: int) -> pd.DataFrame:
    """Iteratively drop users and items with fewer than ``k`` interactions until none remain."""
    while True:
        u = df.groupby("user")["item"].transform("size")
        i = df.groupby("item")["user"].transform("size")
        keep = (u >= k) & (i >= k)
        if keep.all():
            return df
        df = df[keep]


def read_amazon_ratings(path: Path, k: int = 5) -> pd.DataFrame:
    """Raw Amazon ratings CSV (``user,item,rating,timestamp``, no header) with k-core filtering."""
    try:
        raw = pd.read_csv(path, header=None, dtype={0: str, 1: str})
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError, EOFError) as exc:
        raise DataError(f"could not read {path} as an Amazon ratings CSV: {exc}") from exc
    if raw.shape[1] != 4:
        raise DataError(
            f"{path} has {raw.shape[1]} column(s), expected 4 (user, item, rating, timestamp) as in the raw Amazon "
            "ratings_<Category>.csv files; check the file and its separator"
        )
    raw.columns = ["user", "item", "rating", "timestamp"]
    if not pd.api.types.is_numeric_dtype(raw["timestamp"]) and str(raw["timestamp"].iloc[0]).lower() == "timestamp":
        raw = raw.iloc[1:]  # a header row
    df = canonicalize(raw, str(path), rating_col="rating", header_lines=0)
    before = len(df)
    df = k_core(df, k).reset_index(drop=True)
    df.attrs["has_timestamps"] = True
    df.attrs["notes"] = [f"{k}-core filtering kept {len(df):,} of {before:,} ratings"]
    return df

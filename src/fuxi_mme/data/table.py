"""Canonical interactions table and the user-file loader.

The canonical table is a pandas DataFrame with columns ``user``, ``item``, ``timestamp``
(int64 seconds or any monotone unit; all zeros when the source has no time) and optionally
``rating``, in the source's row order. Every reader below produces it and every error names
the file, the row or column, and what to do.
"""

from __future__ import annotations

import gzip
import io
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd


class DataError(ValueError):
    """A user-facing data problem: the message names the input and the fix."""


MILLIS_ABOVE = 1e11  # a unix time above this is in milliseconds (1e11 s is the year 5138)


def millis_to_seconds(t: np.ndarray) -> tuple[np.ndarray, int]:
    """Unix times in seconds: values above :data:`MILLIS_ABOVE` are milliseconds, divided by 1000
    (the readers' and the service's one rule); and how many were."""
    ms = t > MILLIS_ABOVE
    n = int(ms.sum())
    return (np.where(ms, t // 1000, t) if n else t), n


def millis_note(source: str, n: int) -> str:
    return f"{source}: {n:,} timestamp(s) above 1e11 are milliseconds; converted to seconds (events keep their order)"


def plain(v: Any) -> str:
    """A value as a message shows it: numbers as numbers (never ``np.int64(5)``), text in
    quotes (cut at 60 characters), NaN and None as ``missing``."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or v is pd.NaT or (isinstance(v, float) and math.isnan(v)):
        return "missing"
    if isinstance(v, float) and v.is_integer():
        return str(int(v))  # -5.0 read from a column that also holds text or blanks
    if isinstance(v, str):
        return repr(v[:60] + ("..." if len(v) > 60 else ""))
    return str(v)


def read_bytes(path: Path) -> bytes:
    """A file's bytes, gunzipped when it ends in ``.gz``."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError) as exc:
            raise DataError(
                f"{path} is truncated or not a valid gzip file ({exc}); expected a whole gzip file: "
                "compress it again (gzip FILE), fetch it again if it was downloaded, or pass the uncompressed file"
            ) from exc
    return raw


def open_text(path: Path, encoding: str = "utf-8") -> io.TextIOBase:
    """A (gzipped) text file as a text stream; a clear error when it is not ``encoding``."""
    try:
        return io.StringIO(read_bytes(path).decode(encoding))
    except UnicodeDecodeError as exc:
        raise DataError(
            f"{path} is not {encoding} text (byte {exc.start}: {exc.reason}); convert it to {encoding} or check that this is the right file"
        ) from exc


def _suffixes(path: Path) -> list[str]:
    s = [x.lower() for x in path.suffixes]
    if s and s[-1] in (".gz", ".bz2", ".zip", ".xz", ".zst"):
        s = s[:-1]
    return s


def read_table_file(path: str | Path, sep: str | None = None) -> pd.DataFrame:
    """Read CSV / TSV / Parquet / JSON-lines by suffix (compressed text files too)."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist; check the path given to --source")
    if p.is_dir():
        raise DataError(f"{p} is a folder; pass the interactions file inside it (CSV, TSV, Parquet or JSONL)")
    sfx = _suffixes(p)
    kind = sfx[-1] if sfx else ""
    try:
        if kind == ".parquet" or kind == ".pq":
            return pd.read_parquet(p)
        if kind in (".jsonl", ".json", ".ndjson"):
            return pd.read_json(p, lines=True)
        if kind in (".csv", ".tsv", ".txt", ".dat", ""):
            if sep is None:
                sep = "," if kind == ".csv" else "\t"
            engine: Literal["python", "c"] = "python" if len(sep) > 1 else "c"
            return pd.read_csv(p, sep=sep, engine=engine)
    except (ValueError, UnicodeDecodeError, pd.errors.ParserError, OSError) as exc:
        raise DataError(f"could not read {p} as {kind or 'text'}: {exc}") from exc
    raise DataError(f"{p}: unknown file type {kind!r}; use .csv, .tsv, .parquet or .jsonl (optionally .gz)")


def canonicalize(
    df: pd.DataFrame,
    source: str,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str | None = "timestamp",
    rating_col: str | None = None,
    header_lines: int = 1,
) -> pd.DataFrame:
    """Map a raw table to the canonical columns and validate it.

    ``header_lines`` only shapes the line numbers quoted in errors (row i of the data is line
    i + header_lines of a text file).
    """
    if len(df) == 0:
        raise DataError(f"{source} holds no interactions (empty table); check the file and its separator")
    wanted = {"user": user_col, "item": item_col}
    if time_col:
        wanted["timestamp"] = time_col
    if rating_col:
        wanted["rating"] = rating_col
    cols = [str(c) for c in df.columns]
    for role, col in wanted.items():
        if col not in df.columns:
            raise DataError(
                f"{source} has no column {col!r} for the {role} (columns: {', '.join(cols)}); "
                f"name the right one with --set data.{'time' if role == 'timestamp' else role}_col=NAME"
                + (" or check the separator (--set data.sep=...)" if len(cols) == 1 else "")
            )
    out = pd.DataFrame({"user": df[user_col].to_numpy(), "item": df[item_col].to_numpy()})
    for role in ("user", "item"):
        null = out[role].isna().to_numpy()
        if null.any():
            row = int(np.flatnonzero(null)[0])
            raise DataError(
                f"{source}: {int(null.sum())} row(s) have an empty {role} id in column {wanted[role]!r}, "
                f"first at data row {row + 1} (line {row + 1 + header_lines}); drop or fill them"
            )
    if time_col:
        out["timestamp"] = _to_seconds(df[time_col], source, time_col, header_lines)
    else:
        out["timestamp"] = np.zeros(len(out), dtype=np.int64)
    if rating_col:
        r = pd.to_numeric(df[rating_col], errors="coerce")
        if r.isna().any():
            row = int(np.flatnonzero(r.isna().to_numpy())[0])
            raise DataError(
                f"{source}: rating column {rating_col!r} is not a number at data row {row + 1} "
                f"(line {row + 1 + header_lines}, value {plain(df[rating_col].iloc[row])}); fix the row or drop data.rating_col"
            )
        out["rating"] = r.to_numpy(dtype=np.float32)
    return out


def _to_seconds(col: pd.Series, source: str, name: str, header_lines: int) -> np.ndarray:
    if pd.api.types.is_datetime64_any_dtype(col):
        if col.isna().any():
            row = int(np.flatnonzero(col.isna().to_numpy())[0])
            raise DataError(f"{source}: timestamp column {name!r} is empty at data row {row + 1}")
        return (col.astype("datetime64[ns]").astype("int64") // 1_000_000_000).to_numpy()
    num = pd.to_numeric(col, errors="coerce")
    bad = num.isna().to_numpy()
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        raw = col.iloc[row]
        what = "is empty" if plain(raw) == "missing" else f"is not numeric ({plain(raw)})"
        raise DataError(
            f"{source}: timestamp column {name!r} {what} at data row {row + 1} "
            f"(line {row + 1 + header_lines}); give unix times as numbers, "
            "or --set data.time_col=none to use file order"
        )
    neg = (num < 0).to_numpy()
    if neg.any():
        row = int(np.flatnonzero(neg)[0])
        raise DataError(
            f"{source}: timestamp column {name!r} is negative at data row {row + 1} "
            f"(line {row + 1 + header_lines}, value {plain(col.iloc[row])}); timestamps must be unix times >= 0"
        )
    return np.floor(num.to_numpy(dtype=np.float64)).astype(np.int64)


def load_user_file(
    path: str | Path,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str | None = "timestamp",
    rating_col: str | None = None,
    sep: str | None = None,
) -> pd.DataFrame:
    """Read a user's interactions file and return the canonical table."""
    p = Path(path)
    df = read_table_file(p, sep=sep)
    sfx = _suffixes(p)
    header = 0 if sfx and sfx[-1] in (".parquet", ".pq", ".jsonl", ".json", ".ndjson") else 1
    return canonicalize(df, str(p), user_col, item_col, time_col, rating_col, header_lines=header)

"""Readers for the layouts :mod:`fuxi_mme.data.formats` detects: each returns the canonical
table of :mod:`fuxi_mme.data.table` (user, item, timestamp, optional rating; ``behavior`` for
sessions) with ``attrs["has_timestamps"]`` and ``attrs["notes"]``; errors are one-line
:class:`DataError` messages naming the file and line."""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from .formats import (
    _ID,
    _PARQUET_ERRORS,
    _POSITIONS,
    _SEP_NAMES,
    FORMATS,
    Detected,
    _Cols,
    _content,
    _error,
    _json_records,
    _ml_fields,
    _parquet_parts,
    _show,
    _text,
    column_alias,
)
from .table import millis_note, millis_to_seconds


def _ids(s: pd.Series, role: str, src: str, where: Callable[[int], str]) -> np.ndarray:
    """Integer ids when every id is a whole number, else strings."""
    numeric = pd.api.types.is_numeric_dtype(s) and not pd.api.types.is_bool_dtype(s)
    text = s if numeric else s.astype(str).str.strip()
    empty = (s.isna() | (text.astype(str) == "")).to_numpy()
    if empty.any():
        i = int(np.flatnonzero(empty)[0])
        raise _error(f"{src}: {where(i)} has no {role} id (column {s.name!r} is empty); expected a user and an item on every row")
    if numeric:
        v = s.to_numpy(dtype=np.float64)
        odd = ~((np.floor(v) == v) & (np.abs(v) < 2**53))
        if odd.any():
            i = int(np.flatnonzero(odd)[0])
            raise _error(f"{src}: {where(i)}: {role} id {_show(s.iloc[i])} is not a whole number; expected integer or text ids")
        return v.astype(np.int64)
    if text.str.fullmatch(_ID.pattern).all():
        return text.to_numpy(dtype=object).astype(np.int64)
    return text.to_numpy(dtype=object)


def _epoch(dt: pd.Series) -> np.ndarray:
    zero = pd.Timestamp(0, tz="UTC") if getattr(dt.dt, "tz", None) is not None else pd.Timestamp(0)
    return ((dt - zero) // pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)


def _seconds(s: pd.Series, src: str, where: Callable[[int], str]) -> np.ndarray:
    """Unix seconds from numbers or dates; a one-line error at the first missing or negative one."""
    if pd.api.types.is_datetime64_any_dtype(s):
        v = _epoch(s)
    else:
        ok = (str, int, float, np.number)
        scalar = s.map(lambda x: x if isinstance(x, ok) and not isinstance(x, bool) else None) if s.dtype == object else s
        v = pd.to_numeric(scalar, errors="coerce").to_numpy(dtype=np.float64)
        if np.isnan(v).all() and s.dtype != np.float64:
            dt = pd.to_datetime(scalar.astype(str), errors="coerce", utc=True, format="ISO8601")
            if not dt.isna().any():
                v = _epoch(dt)
    bad = ~(np.isfinite(v) & (v >= 0) & (v < 2**62))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _error(
            f"{src}: {where(i)}: timestamp {_show(s.iloc[i])} in column {s.name!r} is not a unix time >= 0; "
            "expected numbers or ISO dates (or --set data.time_col=none to use file order)"
        )
    return np.floor(v).astype(np.int64)


def _canonical(df: pd.DataFrame, src: str, cols: _Cols, where: Callable[[int], str], keep: tuple[str, ...] = ()) -> pd.DataFrame:
    """Raw columns -> user, item, timestamp[, rating][, keep...]; validates with line-naming errors."""
    if len(df) == 0:
        raise _error(f"{src} holds no interactions (a header or blank lines only); expected one interaction per row")
    names = [str(c) for c in df.columns]
    notes = []
    for role, default in (("user", "user"), ("item", "item"), ("time", "timestamp")):
        if getattr(cols, role) == default and default not in df.columns:
            alias = column_alias(names, role)
            if alias is not None:
                cols = replace(cols, **{role: alias})
                notes.append(f"{src}: column {alias!r} is the {role} (no {default!r} column)")
    wanted = {"user": cols.user, "item": cols.item, "rating": cols.rating, "timestamp": cols.time if cols.time != "timestamp" else None}
    for role, col in wanted.items():
        if col is not None and col not in df.columns:
            key = "time" if role == "timestamp" else role
            raise _error(f"{src} has no column {col!r} for the {role} (columns: {', '.join(names[:12])}); name it with --set data.{key}_col=NAME")
    out = pd.DataFrame({"user": _ids(df[cols.user], "user", src, where), "item": _ids(df[cols.item], "item", src, where)})
    if cols.time is not None and cols.time in df.columns:
        out["timestamp"], millis = millis_to_seconds(_seconds(df[cols.time], src, where))
        if millis:
            notes.append(millis_note(src, millis))
        has_ts = True
    else:
        out["timestamp"] = np.arange(len(out), dtype=np.int64)
        has_ts = False
        if cols.time is not None:
            notes.append(f"{src} has no {cols.time!r} column: file order is the sequence order (name one with --set data.time_col=NAME)")
    if cols.rating is not None:
        r = pd.to_numeric(df[cols.rating], errors="coerce")
        if r.isna().any():
            i = int(np.flatnonzero(r.isna().to_numpy())[0])
            raise _error(f"{src}: {where(i)}: rating {_show(df[cols.rating].iloc[i])} in column {cols.rating!r} is not a number")
        out["rating"] = r.to_numpy(dtype=np.float32)
    for c in keep:
        out[c] = df[c].to_numpy()
    out.attrs["has_timestamps"] = has_ts
    out.attrs["notes"] = notes
    return out


def _line_of(lines: np.ndarray) -> Callable[[int], str]:
    return lambda i: f"line {int(lines[i])}"


def _read_table(p: Path, det: Detected, cols: _Cols, src: str) -> pd.DataFrame:
    if det.syntax == "parquet":
        try:
            if det.container == "parquet-folder":
                df = pd.concat([pq.read_table(f).to_pandas() for f in _parquet_parts(p)], ignore_index=True)
            else:
                df = pq.read_table(pa.BufferReader(_content(p, det))).to_pandas()
        except _PARQUET_ERRORS as exc:
            raise _error(f"{src} is not a readable Parquet file ({type(exc).__name__}: {exc}); write it again") from exc
        return _canonical(df, src, cols, lambda i: f"row {i + 1}")
    text, notes = _text(src, _content(p, det))
    lines = text.splitlines()
    if det.syntax == "jsonl":
        recs, at = _json_records(src, enumerate(lines, start=1))
        out = _canonical(pd.DataFrame.from_records(recs), src, cols, _line_of(np.asarray(at)))
    else:
        out = _read_text_table(text, det, cols, src)
    out.attrs["notes"] = notes + out.attrs["notes"]
    return out


def _read_text_table(text: str, det: Detected, cols: _Cols, src: str) -> pd.DataFrame:
    sep = det.sep or ","
    stripped = text.lstrip("\r\n")
    skipped = text[: len(text) - len(stripped)].count("\n")
    header = bool(det.header)
    try:
        df = pd.read_csv(
            io.StringIO(stripped),
            sep=r"\s+" if sep == " " else sep,
            header=0 if header else None,
            dtype=str,
            keep_default_na=False,
            na_values=[""],
            skip_blank_lines=False,
            engine="python" if len(sep) > 1 and sep != " " else "c",
        )
    except (pd.errors.ParserError, ValueError) as exc:
        m = re.search(r"Expected (\d+) fields in line (\d+), saw (\d+)", str(exc))
        if m:
            n = int(m.group(2)) + skipped
            raise _error(
                f"{src}: line {n} has {m.group(3)} {_SEP_NAMES.get(sep, repr(sep))}-separated fields, expected {m.group(1)} as on the first line"
            ) from exc
        raise _error(f"{src} could not be read as {_SEP_NAMES.get(sep, repr(sep))}-separated text ({str(exc).strip()})") from exc
    lines = np.arange(len(df)) + 1 + skipped + int(header)
    keep = ~df.isna().all(axis=1).to_numpy()
    df, lines = df[keep].reset_index(drop=True), lines[keep]
    if not header:
        width = df.shape[1]
        if width not in _POSITIONS:
            raise _error(f"{src} has {width} columns and no header row; add a header naming the user, item and timestamp columns")
        positional = list(_POSITIONS[width])
        looks_rating = width == 3 and _rating_like(df.iloc[:, 2])
        if looks_rating:  # user,item,rating (no timestamps), not user,item,timestamp
            positional[2] = "rating"
        df.columns = pd.Index(positional)
        cols = _Cols("user", "item", "timestamp" if "timestamp" in positional else None, "rating" if "rating" in positional else None)
    out = _canonical(df, src, cols, _line_of(lines))
    if not header and looks_rating:
        out.attrs["notes"] = out.attrs["notes"] + [
            f"{src}: the third of its 3 unnamed columns holds only {_value_range(df['rating'])}: read as a rating, not a timestamp, "
            "so the file order is the sequence order (add a header row naming the columns to read it otherwise)"
        ]
    return out


def _rating_like(col: pd.Series) -> bool:
    """A headerless third column that is a rating, not a timestamp: numbers, all within 0-10,
    of at most 21 distinct values (1-5 stars, 0.5 steps to 10); a time column of the same file
    (seconds, milliseconds, or positions) runs far past that."""
    v = pd.to_numeric(col, errors="coerce")
    return bool(len(v)) and not v.isna().any() and bool(v.between(0, 10).all()) and v.nunique() <= 21


def _value_range(col: pd.Series) -> str:
    v = pd.to_numeric(col)
    return f"values {v.min():g} to {v.max():g} ({v.nunique()} distinct)"


def _read_sequences(p: Path, det: Detected, cols: _Cols, src: str) -> pd.DataFrame:
    text, notes = _text(src, _content(p, det))
    users: list[str] = []
    items: list[str] = []
    for n, line in enumerate(text.splitlines(), start=1):
        parts = line.split()
        if not parts:
            continue
        if det.format == "pairs" and len(parts) != 2:
            raise _error(f"{src}: line {n} has {len(parts)} field(s): {_show(line)}; expected exactly 2 integers `user item` (SASRec layout)")
        if len(parts) < 2:
            raise _error(f"{src}: line {n} has 1 field: {_show(line)}; expected at least 2 integers `user item item ...` (S3-Rec layout)")
        bad = next((t for t in parts if not _ID.fullmatch(t)), None)
        if bad is not None:
            raise _error(f"{src}: line {n}: {_show(bad)} is not an integer id; expected whitespace-separated integer ids `user item ...`")
        users.extend([parts[0]] * (len(parts) - 1))
        items.extend(parts[1:])
    if not users:
        raise _error(f"{src} holds no sequences; expected `user item ...` lines")
    df = pd.DataFrame({"user": np.array(users, dtype=np.int64), "item": np.array(items, dtype=np.int64)})
    df["timestamp"] = np.arange(len(df), dtype=np.int64)
    df.attrs["has_timestamps"] = False
    df.attrs["notes"] = notes + [f"{src} has no timestamps ({det.format} layout): the file order is the sequence order"]
    return df


def _read_movielens(p: Path, det: Detected, cols: _Cols, src: str) -> pd.DataFrame:
    text, notes = _text(src, _content(p, det))
    rows, at = [], []
    k = 0
    for n, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            k = k or len(line.strip().split("::"))
            rows.append(_ml_fields(src, n, line, k, numbers=False))  # numbers: checked below, at once
            at.append(n)
    names = ["user", "item", "rating", "timestamp"][:k]
    df = pd.DataFrame(rows, columns=names) if rows else pd.DataFrame(columns=names)
    bad = np.flatnonzero(np.column_stack([pd.to_numeric(df[c], errors="coerce").isna() for c in names]).any(axis=1))
    if len(bad):
        _ml_fields(src, at[bad[0]], text.splitlines()[at[bad[0]] - 1], k)  # raises, naming the field
    out = _canonical(df, src, _Cols("user", "item", "timestamp" if k == 4 else None, "rating"), _line_of(np.asarray(at)))
    out.attrs["notes"] = notes + out.attrs["notes"] + ([] if k == 4 else [f"{src} has no timestamps: the file order is the sequence order"])
    return out


def _read_sessions(p: Path, det: Detected, cols: _Cols, src: str) -> pd.DataFrame:
    text, notes = _text(src, _content(p, det))
    recs, at = _json_records(src, enumerate(text.splitlines(), start=1))
    users, items, ts, kinds, lines = [], [], [], [], []
    for obj, n in zip(recs, at):
        events = obj.get("events")
        if "session" not in obj or not isinstance(events, list):
            raise _error(
                f"{src}: line {n} has keys {', '.join(map(str, list(obj)[:6]))}; expected an OTTO session {{'session': .., 'events': [...]}}"
            )
        for k, ev in enumerate(events):
            if not isinstance(ev, dict) or "aid" not in ev or "ts" not in ev:
                raise _error(f"{src}: line {n}, event {k + 1} is {_show(json.dumps(ev))}; expected an object with 'aid', 'ts' and 'type'")
            users.append(obj["session"])
            items.append(ev["aid"])
            ts.append(ev["ts"])
            kinds.append(str(ev.get("type", "")))
            lines.append(n)
    raw = pd.DataFrame({"user": pd.Series(users, dtype=object), "item": pd.Series(items, dtype=object), "timestamp": pd.Series(ts, dtype=object)})
    raw["behavior"] = kinds
    out = _canonical(raw, src, _Cols("user", "item", "timestamp", None), _line_of(np.asarray(lines)), keep=("behavior",))
    out.attrs["notes"] = notes + out.attrs["notes"]
    return out


_READERS: dict[str, Callable[[Path, Detected, _Cols, str], pd.DataFrame]] = {
    "table": _read_table,
    "pairs": _read_sequences,
    "sequences": _read_sequences,
    "movielens": _read_movielens,
    "sessions": _read_sessions,
}


def read(
    path: str | Path,
    detected: Detected,
    *,
    user_col: str = "user",
    item_col: str = "item",
    time_col: str | None = "timestamp",
    rating_col: str | None = None,
    sep: str | None = None,
    header: bool | None = None,
) -> pd.DataFrame:
    """Read ``path`` as ``detected`` says into the canonical table.

    Column names apply to tables with a header (Parquet, JSON lines, text with a header row);
    ``sep`` and ``header`` override what detection found. Returns user, item, timestamp
    (int64), rating (float32) when there is one, behavior for sessions.
    """
    p = Path(path)
    if detected.format not in _READERS:
        raise _error(f"unknown data format {detected.format!r}; expected one of {', '.join(FORMATS)}")
    det = replace(detected, sep=sep if sep is not None else detected.sep, header=header if header is not None else detected.header)
    src = f"{p}:{det.member}" if det.member else str(p)
    if not p.exists():
        raise _error(f"{p} does not exist; check the path given to --source")
    df = _READERS[det.format](p, det, _Cols(user_col, item_col, time_col, rating_col), src)
    df.attrs["notes"] = [f"{src}: {det.format} ({det.reason})"] + list(df.attrs.get("notes", []))
    return df

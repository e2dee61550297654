"""Recognise and read interaction files in the common academic layouts.

``detect(path)`` looks at the content (magic bytes, the first lines), not the suffix, and
returns a :class:`Detected` naming the layout with a one-line ``reason``; ``read(path, detected)``
returns the canonical table of :mod:`fuxi_mme.data.table` (user, item, timestamp, optional
rating) with ``attrs["has_timestamps"]`` and ``attrs["notes"]``.

========== ================================================= ==============================================
format     detected by                                       read as
========== ================================================= ==============================================
table      text with one separator (tab , ; | or spaces),    columns by name with a header row; without:
           Parquet (file or folder of parts), flat JSON      user,item[,timestamp] by position, 4 columns
           lines                                             user,item,rating,timestamp
pairs      whitespace integers, exactly 2 on every line      SASRec ``user item``; file order is time order
sequences  whitespace integers, >= 2 per line, counts vary   S3-Rec ``user item item ...``; line order
movielens  ``::`` between 3 or 4 numbers                     ``user::item::rating[::timestamp]``
sessions   JSON lines ``{"session", "events": [{aid,ts}]}``  one row per event (OTTO); ``type`` -> behavior
========== ================================================= ==============================================

Ambiguity rules (each stated in ``reason`` when it applies):

* exactly 2 integers on every line is ``pairs``: a headerless 2-column table reads the same.
* whitespace integers with a constant 3 or 4 per line is a headerless ``table``, 5 or more is
  ``sequences`` (a sequence file whose users all have 2 or 3 items needs ``data.format``).
* a first row is a header when a cell is not a number over a column of numbers, or when it
  names a known column (user, item, timestamp, userId, ...).
* without a time column the file order is the sequence order: timestamp = position in the
  file, ``has_timestamps`` False. Session ``ts`` above 1e11 are milliseconds and become seconds.

Compression (gzip, a zip with one data member) and a folder of Parquet parts (Spark, DuckDB,
Ray; ``_SUCCESS``, ``.crc`` and hidden files ignored) wrap any of these. Errors are one-line
:class:`DataError` messages naming the file, the line, what was found and what was expected.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import math
import re
import zipfile
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.parquet as pq  # type: ignore[import-untyped]

from .table import DataError

FORMATS = ("table", "sequences", "pairs", "movielens", "sessions")
_HEAD = 1 << 20  # bytes of (decompressed) content that detection reads
_SAMPLE = 2000  # lines of that head that detection classifies
_GZIP, _ZIPS, _PARQUET = b"\x1f\x8b", (b"PK\x03\x04", b"PK\x05\x06"), b"PAR1"
_ARCHIVE_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, KeyError, NotImplementedError, RuntimeError, ValueError)
_PARQUET_ERRORS = (pa.ArrowException, OSError, ValueError, TypeError, KeyError, IndexError, NotImplementedError, EOFError)
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_ID = re.compile(r"[0-9]{1,18}")
_KNOWN_NAMES = {"user", "item", "timestamp", "time", "ts", "rating", "userid", "user_id", "itemid", "item_id", "movieid", "movie_id", "session"}
_SEP_NAMES = {"\t": "tab", ",": "comma", ";": "semicolon", "|": "pipe", " ": "whitespace", "::": "'::'"}
_ALIASES = {
    "user": {"userid", "user_id", "session", "session_id", "visitorid", "customer_id", "reviewerid"},
    "item": {"itemid", "item_id", "movieid", "movie_id", "aid", "video_id", "product_id", "asin", "article_id"},
    "time": {"ts", "time", "datetime", "date", "unix_time", "unixreviewtime", "t_dat"},
}
_ML = "user::item::rating[::timestamp] (MovieLens ratings.dat)"
_POSITIONS = {2: ["user", "item"], 3: ["user", "item", "timestamp"], 4: ["user", "item", "rating", "timestamp"]}


@dataclass(frozen=True)
class Detected:
    """What :func:`detect` found. ``sep`` " " means any run of whitespace."""

    format: str  # one of FORMATS
    compression: str = "none"  # none | gzip | zip
    container: str = "file"  # file | parquet-folder
    header: bool | None = None  # tables: whether the first row names the columns
    sep: str | None = None  # text field separator
    reason: str = ""  # one line: what was found and which rule decided
    syntax: str = "text"  # text | jsonl | parquet
    member: str | None = None  # zip: the data member read


@dataclass(frozen=True)
class _Cols:
    user: str
    item: str
    time: str | None
    rating: str | None


def _error(msg: str) -> DataError:
    return DataError(" ".join(msg.split()))  # one line, whatever the values held


def _show(v: Any) -> str:
    """A value as plain text for a message (no np.int64(...), no multi-line)."""
    if isinstance(v, np.generic):
        v = v.item()
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "(empty)"
    s = v if isinstance(v, str) else str(v)
    return repr(s[:60] + ("..." if len(s) > 60 else "")) if isinstance(v, str) else s


def _hidden(parts: tuple[str, ...]) -> bool:
    return any(x.startswith((".", "_")) for x in parts) or parts[-1].endswith(".crc")


# --------------------------------------------------------------------------- containers


def _zip_member(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as z:
            names = [i.filename for i in z.infolist() if not i.is_dir()]
    except _ARCHIVE_ERRORS as exc:
        raise _error(f"{path} starts like a zip archive but is not a readable one ({exc}); download or zip it again") from exc
    data = [n for n in names if not _hidden(tuple(n.split("/")))]
    if len(data) != 1:
        listing = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise _error(
            f"{path} holds {len(data)} data files ({listing or 'none'}), expected exactly one interactions file; extract it and pass that file"
        )
    return data[0]


def _head(path: Path) -> tuple[str, str | None, bytes]:
    """(compression, zip member, the first _HEAD bytes of the content)."""
    with path.open("rb") as f:
        magic = f.read(4)
    try:
        if magic[:2] == _GZIP:
            with gzip.open(path, "rb") as g:
                return "gzip", None, g.read(_HEAD)
        if magic in _ZIPS:
            member = _zip_member(path)
            with zipfile.ZipFile(path) as z, z.open(member) as m:
                return "zip", member, m.read(_HEAD)
    except _ARCHIVE_ERRORS as exc:
        raise _error(f"{path} is a corrupt or truncated {'gzip' if magic[:2] == _GZIP else 'zip'} archive ({exc}); download it again") from exc
    with path.open("rb") as f:
        return "none", None, f.read(_HEAD)


def _content(path: Path, det: Detected) -> bytes:
    try:
        if det.compression == "gzip":
            return gzip.decompress(path.read_bytes())
        if det.compression == "zip":
            with zipfile.ZipFile(path) as z:
                return z.read(det.member or _zip_member(path))
        return path.read_bytes()
    except _ARCHIVE_ERRORS as exc:
        raise _error(f"{path} is a corrupt or truncated {det.compression} archive ({exc}); download it again") from exc


def _text(src: str, raw: bytes) -> tuple[str, list[str]]:
    if b"\x00" in raw:
        line = raw.count(b"\n", 0, raw.index(b"\x00")) + 1
        raise _error(f"{src}: line {line} holds a NUL byte: a binary file, expected text, Parquet, gzip or zip")
    try:
        return raw.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        return raw.decode("latin-1"), [f"{src} is not UTF-8; read as ISO-8859-1"]


def _parquet_parts(folder: Path) -> list[Path]:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not _hidden(p.relative_to(folder).parts))
    for f in files:
        with f.open("rb") as fh:
            if fh.read(4) != _PARQUET:
                raise _error(f"{folder} is a folder: only Parquet parts are read from one, but {f.name} is not Parquet; pass the data file itself")
    if not files:
        raise _error(f"{folder} is a folder with no Parquet files (only _SUCCESS, .crc or hidden ones are ignored); pass the data file itself")
    return files


# --------------------------------------------------------------------------- detection


def _split(line: str, sep: str) -> list[str]:
    if sep == " ":
        return line.split()
    return next(csv.reader([line], delimiter=sep))


def _is_num(cell: str) -> bool:
    return bool(_NUMBER.fullmatch(cell.strip()))


def _has_header(rows: list[list[str]]) -> bool:
    first, rest = rows[0], rows[1:]
    if any(c.strip().lower() in _KNOWN_NAMES for c in first):
        return True
    for j, cell in enumerate(first):
        col = [r[j] for r in rest if len(r) > j and r[j].strip()]
        if col and cell.strip() and not _is_num(cell) and all(_is_num(c) for c in col):
            return True
    return False


def _json_kind(obj: dict[str, Any]) -> str:
    return "sessions" if "session" in obj and isinstance(obj.get("events"), list) else "table"


def _detect_json(src: str, lines: list[tuple[int, str]]) -> tuple[str, str]:
    recs, at = _json_records(src, lines)
    kinds = [_json_kind(obj) for obj in recs]
    bad = next((i for i, kind in enumerate(kinds) if kind != kinds[0]), None)
    if bad is not None:
        what = {"sessions": 'an OTTO session {"session", "events": [...]}', "table": "a flat object"}
        keys = ", ".join(map(str, list(recs[bad])[:4]))
        raise _error(f"{src}: line {at[bad]} is {what[kinds[bad]]} (keys {keys}) but line {at[0]} is {what[kinds[0]]}: mixed layouts")
    if kinds[0] == "sessions":
        return "sessions", 'JSON lines {"session", "events": [{"aid", "ts", "type"}]}: OTTO session layout, one row per event'
    return "table", "JSON lines of flat objects: a table read by column name"


def _ml_fields(src: str, n: int, line: str, k: int, numbers: bool = True) -> list[str]:
    """The fields of MovieLens line ``n``; ``k``: the field count of the file's first line."""
    parts = line.strip().split("::")
    if k not in (3, 4) or len(parts) != k:
        found = f"{len(parts)} '::'-separated field(s)" if "::" in line else "no '::'" + (" (tab-separated)" if "\t" in line else "")
        raise _error(f"{src}: line {n} has {found}: {_show(line)}; expected {k if k in (3, 4) else '3 or 4'} fields {_ML}")
    bad = next((x for x in parts if not _is_num(x)), None) if numbers else None
    if bad is not None:
        raise _error(f"{src}: line {n}: {_show(bad)} is not a number; expected numeric fields {_ML}")
    return parts


def _detect_text(src: str, lines: list[tuple[int, str]]) -> Detected:
    n0, first = lines[0]
    if first.lstrip().startswith("{"):
        fmt, why = _detect_json(src, lines)
        return Detected(fmt, header=fmt == "table" or None, reason=why, syntax="jsonl")
    if "::" in first:
        k = len(first.strip().split("::"))
        for n, line in lines:
            _ml_fields(src, n, line, k)
        return Detected(
            "movielens",
            sep="::",
            header=False,
            reason=f"'::'-separated numbers, {k} per line: MovieLens user::item::rating{'::timestamp' if k == 4 else ''}",
        )
    sep = next((c for c in ("\t", ",", ";", "|") if c in first), " ")
    rows = [_split(line, sep) for _, line in lines]
    header = _has_header(rows)
    data = rows[1:] if header else rows
    counts = [len(r) for r in data] or [len(rows[0])]
    lo, hi = min(counts), max(counts)
    all_ids = all(_ID.fullmatch(c) for r in data for c in r)
    name = _SEP_NAMES[sep]
    if sep == " " and not header and (lo != hi or (all_ids and hi >= 5)):
        what = "integers" if all_ids else "fields"
        return Detected(
            "sequences", sep=" ", reason=f"whitespace-separated {what}, {lo} to {hi} per line: S3-Rec sequence layout `user item item ...`"
        )
    if sep == " " and not header and all_ids and hi == 2 and lo == 2:
        return Detected(
            "pairs",
            sep=" ",
            reason=f"whitespace-separated integers, exactly 2 on each of {len(data)} lines: SASRec layout `user item`, file order is time order "
            "(rule: a headerless 2-column table reads the same way)",
        )
    width = len(rows[0])
    bad = next((i for i, r in enumerate(rows) if len(r) != width), None)
    if bad is not None or width < 2:
        i = bad if bad is not None else 0
        raise _error(
            f"{src}: line {lines[i][0]} has {len(rows[i])} {name}-separated field(s): {_show(lines[i][1])}; "
            f"expected {max(width, 2)} as on line {n0} (a table needs user and item columns)"
        )
    if header:
        return Detected(
            "table", sep=sep, header=True, reason=f"{name}-separated text with a header row ({', '.join(rows[0][:6])}): a table read by column name"
        )
    cols = ",".join(_POSITIONS.get(width, ["?"]))
    rule = " (rule: a constant 3 or 4 whitespace integers is a table, not sequences)" if sep == " " and all_ids else ""
    return Detected("table", sep=sep, header=False, reason=f"{name}-separated text, {width} columns, no header row: columns by position {cols}{rule}")


def detect(path: str | Path) -> Detected:
    """Look at ``path``'s bytes and first lines; return its layout or raise a one-line DataError."""
    p = Path(path)
    if not p.exists():
        raise _error(f"{p} does not exist; check the path given to --source")
    if p.is_dir():
        parts = _parquet_parts(p)
        return Detected(
            "table",
            container="parquet-folder",
            header=True,
            syntax="parquet",
            reason=f"folder of {len(parts)} Parquet part(s): a table read by column name",
        )
    compression, member, head = _head(p)
    wrap = {"none": "", "gzip": "gzip-compressed ", "zip": f"zip member {member}: "}[compression]
    if p.stat().st_size == 0 or not head:
        raise _error(f"{p} is empty{' inside the archive' if compression != 'none' else ''}; expected interactions, one per line or a Parquet table")
    if head.startswith(_PARQUET):
        return Detected(
            "table", compression, header=True, syntax="parquet", member=member, reason=f"{wrap}Parquet (magic PAR1): a table read by column name"
        )
    text, _ = _text(str(p), head)
    lines = text.splitlines()
    if len(head) == _HEAD and len(lines) > 1:
        lines = lines[:-1]  # the last line may be cut by the head
    numbered = [(n, line) for n, line in enumerate(lines, start=1) if line.strip()][:_SAMPLE]
    if not numbered:
        raise _error(f"{p} holds only blank lines; expected interactions, one per line")
    det = _detect_text(str(p), numbered)
    return replace(det, compression=compression, member=member, reason=wrap + det.reason)


# --------------------------------------------------------------------------- reading


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
            alias = next((c for c in names if c.lower() in _ALIASES[role]), None)
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
        out["timestamp"] = _seconds(df[cols.time], src, where)
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


def _json_records(src: str, lines: Iterable[tuple[int, str]]) -> tuple[list[dict[str, Any]], list[int]]:
    """The JSON object on each non-blank numbered line, and its line number."""
    recs, at = [], []
    for n, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as exc:
            raise _error(f"{src}: line {n} is not valid JSON ({exc}); expected one JSON object per line") from exc
        if not isinstance(obj, dict):
            raise _error(f"{src}: line {n} holds a JSON {type(obj).__name__}, expected one object per line")
        recs.append(obj)
        at.append(n)
    return recs, at


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
        positional = _POSITIONS[width]
        df.columns = pd.Index(positional)
        cols = _Cols("user", "item", "timestamp" if "timestamp" in positional else None, "rating" if "rating" in positional else None)
    return _canonical(df, src, cols, _line_of(lines))


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
    if out["timestamp"].max() > 1e11:
        out["timestamp"] = out["timestamp"] // 1000
        notes.append(f"{src}: event ts are milliseconds (above 1e11); converted to seconds, events keep their order")
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

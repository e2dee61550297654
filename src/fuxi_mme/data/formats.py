"""Recognise and read interaction files in the common academic layouts.

``detect(path)`` looks at the content (magic bytes, the first lines), not the suffix, and
returns a :class:`Detected` naming the layout with a one-line ``reason``;
:func:`fuxi_mme.data.readers.read` (``read(path, detected)``) returns the canonical table of
:mod:`fuxi_mme.data.table` (user, item, timestamp, optional
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
  ``sequences`` (a sequence file whose users all have 2 or 3 items needs ``data.format``), also
  when a few tokens (at most 1 in 20) are not integers: the reader then names the bad id's line.
* a first row is a header when a cell is not a number over a column of numbers, or when it
  names a known column (user, item, timestamp, userId, ...).
* without a time column the file order is the sequence order: timestamp = position in the
  file, ``has_timestamps`` False. Times above 1e11 (any layout) are milliseconds and become seconds.

Compression (gzip, a zip with one data member) and a folder of Parquet parts (Spark, DuckDB,
Ray; ``_SUCCESS``, ``.crc`` and hidden files ignored) wrap any of these. Errors are one-line
:class:`DataError` messages naming the file, the line, what was found and what was expected.
"""

from __future__ import annotations

import csv
import gzip
import json
import math
import re
import zipfile
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]

from .table import DataError

FORMATS = ("table", "sequences", "pairs", "movielens", "sessions")
_HEAD = 1 << 20  # bytes of (decompressed) content that detection reads
_SAMPLE = 2000  # lines of that head that detection classifies
_GZIP, _ZIPS, _PARQUET = b"\x1f\x8b", (b"PK\x03\x04", b"PK\x05\x06"), b"PAR1"
# zipfile raises IndexError for a member whose name a damaged central directory left empty
_ARCHIVE_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, KeyError, IndexError, NotImplementedError, RuntimeError, ValueError)
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


def column_alias(names: list[str], role: str) -> str | None:
    """The first of ``names`` that is a usual name of the ``role`` column ("user", "item",
    "time"), e.g. ``user_id``, ``movieId``, ``ts``; None if none is."""
    return next((c for c in names if c.lower() in _ALIASES[role]), None)


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
        raise _corrupt(path, "zip", exc) from exc
    data = [n for n in names if not _hidden(tuple(n.split("/")))]
    if len(data) != 1:
        listing = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
        raise _error(
            f"{path} holds {len(data)} data files ({listing or 'none'}); expected exactly one interactions file: "
            "keep one, or unzip it and pass the file"
        )
    return data[0]


def _corrupt(path: Path, kind: str, exc: BaseException) -> DataError:
    """The error for a user's gzip or zip file that cannot be read to its end."""
    again = "compress it again (gzip FILE)" if kind == "gzip" else "zip it again"
    return _error(f"{path} is a corrupt or truncated {kind} file ({exc}); expected a whole {kind} file: {again}, or pass the uncompressed file")


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
    except DataError:
        raise  # already says what is wrong (a zip of several files, ...)
    except _ARCHIVE_ERRORS as exc:
        raise _corrupt(path, "gzip" if magic[:2] == _GZIP else "zip", exc) from exc
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
    except DataError:
        raise
    except _ARCHIVE_ERRORS as exc:
        if det.compression == "none":
            raise _error(f"{path} could not be read ({exc}); expected a readable file: check its permissions") from exc
        raise _corrupt(path, det.compression, exc) from exc


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
                raise _error(
                    f"{folder} is a folder: only Parquet parts are read from one, but {f.name} is not Parquet; pass the data file itself, "
                    "or for a named dataset's folder give its name too (fuxi-mme data info ml-100k --source FOLDER)"
                )
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
    if first.lstrip().startswith("[") and ("{" in first or first.strip() == "["):
        raise _error(
            f"{src} is one JSON array; the reader takes JSON lines, one object per line: convert it "
            '(python -c "import json,sys; [print(json.dumps(o)) for o in json.load(sys.stdin)]" < FILE > FILE.jsonl)'
        )
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
    tokens = sum(counts)
    odd = sum(not _ID.fullmatch(c) for r in data for c in r)
    all_ids = odd == 0
    name = _SEP_NAMES[sep]
    # a few non-integers among 5+ integer fields per line is a sequence file with a bad id
    # (the reader names its line), not a table: no table has that many positional columns
    if sep == " " and not header and (lo != hi or (hi >= 5 and odd <= max(1, tokens // 20))):
        what = "integers" if all_ids else "fields"
        per = f"{lo} to {hi}" if lo != hi else f"{hi}"
        return Detected("sequences", sep=" ", reason=f"whitespace-separated {what}, {per} per line: S3-Rec sequence layout `user item item ...`")
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

"""``fuxi-mme recommend --input FILE --output FILE``: recommendations for a whole file of users.

Input (CSV, TSV, Parquet or JSON lines), either layout:

* long: one interaction per row, columns ``user``, ``item`` and optionally ``timestamp``
  (or the names training data are read by, e.g. ``user_id``, ``movieId``, ``ts``; other names
  with ``--user-col`` / ``--item-col`` / ``--time-col``); rows of a user are
  taken oldest first (sorted by timestamp when given, ties in file order, else file order);
* nested: one user per row with a list column ``history`` (and optionally ``timestamps``).

Output, same format as the output file's suffix: one row per recommendation with columns
``user``, ``rank``, ``item``, ``score`` and ``title`` (when the dataset has titles). Users whose
history can't be used (none of its items is known, ...) are listed on stderr with the reason
and left out. The file is written to a temporary name and renamed.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..data.formats import column_alias
from ..data.table import DataError, read_table_file
from ..utils.runinfo import as_created
from .recommender import Query, Recommender, RequestError


def read_queries(
    path: str | Path, k: int, exclude_seen: bool | None, user_col="user", item_col="item", time_col: str | None = "timestamp"
) -> list[tuple[Any, Query]]:
    df = read_table_file(path)
    user_col, item_col, time_col = (_alias(df, c, role) for c, role in ((user_col, "user"), (item_col, "item"), (time_col, "time")))
    if "history" in df.columns:
        if user_col not in df.columns:
            raise DataError(f"{path}: nested input needs a {user_col!r} column next to 'history'")
        out = []
        for _, row in df.iterrows():
            hist = list(row["history"]) if row["history"] is not None else []
            ts = row.get("timestamps") if "timestamps" in df.columns else None
            ts = [int(t) for t in ts] if ts is not None and not (isinstance(ts, float) and np.isnan(ts)) else None
            out.append((row[user_col], Query(hist, ts, k, exclude_seen)))
        return out
    missing = [c for c in (user_col, item_col) if c not in df.columns]
    if missing:
        raise DataError(
            f"{path} has no column(s) {', '.join(map(repr, missing))} (columns: {', '.join(map(str, df.columns))}); "
            "use --user-col/--item-col, or give a nested file with a 'history' column"
        )
    has_t = time_col is not None and time_col in df.columns
    if has_t:
        df = df.assign(_pos=np.arange(len(df))).sort_values([time_col, "_pos"], kind="stable")
    out = []
    for user, g in df.groupby(user_col, sort=False):
        ts = [int(t) for t in g[time_col]] if has_t else None
        out.append((user, Query(g[item_col].tolist(), ts, k, exclude_seen)))
    return out


def _alias(df: pd.DataFrame, col: str | None, role: str) -> str | None:
    """The default column name, or the column training data would read as it (``user_id``,
    ``movieId``, ``ts``, ...: data/formats.py) when the default is absent; a name the user
    gave stands."""
    if col is None or col in df.columns or col != _DEFAULTS[role]:
        return col
    return column_alias([str(c) for c in df.columns], role) or col


_DEFAULTS = {"user": "user", "item": "item", "time": "timestamp"}


def write_table(df: pd.DataFrame, path: str | Path) -> None:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    sfx = "".join(p.suffixes).lower()
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    os.close(fd)
    try:
        if sfx.endswith((".parquet", ".pq")):
            df.to_parquet(tmp, index=False)
        elif sfx.endswith((".jsonl", ".ndjson", ".json")):
            df.to_json(tmp, orient="records", lines=True, force_ascii=False)
        elif sfx.endswith((".csv", ".tsv", ".txt")) or sfx == "":
            df.to_csv(tmp, index=False, sep="\t" if sfx.endswith(".tsv") else ",")
        else:
            raise DataError(f"{p}: unknown output type {sfx!r}; use .csv, .tsv, .parquet or .jsonl")
        as_created(tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def recommend_file(
    rec: Recommender, inp: str | Path, out: str | Path, k: int, exclude_seen: bool | None, batch_size: int = 256, **cols
) -> dict[str, int]:
    pairs = read_queries(inp, k, exclude_seen, **cols)
    rows: list[dict[str, Any]] = []
    failed = 0
    for s in range(0, len(pairs), batch_size):
        chunk = pairs[s : s + batch_size]
        good, preps = [], []
        for user, q in chunk:
            try:
                preps.append(rec.prepare(q))
                good.append(user)
            except RequestError as exc:
                failed += 1
                print(f"fuxi-mme: user {user!r} skipped: {exc}", file=sys.stderr)
        for user, res in zip(good, rec.score(preps)):
            for r, item in enumerate(res["items"], start=1):
                rows.append({"user": user, "rank": r, **item})
    if not rows and pairs:
        raise DataError(f"{inp}: no user could be scored ({failed} skipped; reasons above)")
    cols_out = ["user", "rank", "item", "score"] + (["title"] if rec.titles is not None else [])
    write_table(pd.DataFrame(rows, columns=cols_out), out)
    return {"users": len(pairs) - failed, "skipped": failed, "rows": len(rows)}

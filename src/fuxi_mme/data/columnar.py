"""Out-of-core preparation of large logs: ``data.engine=columnar`` (docs/datasets.md#large-logs).

Legend: R rows of the input, U users, I items, P partitions, E events of one partition.

The input is a Parquet file or a folder of Parquet parts with integer user and item ids and a
numeric (or Arrow timestamp) time column. Nothing holds the whole log; five streaming passes:

1. **distinct ids**: each record batch's user and item ids are marked in a bitmap over their
   value range (or, for sparse id ranges, kept as sorted uniques and merged);
2. **counts**: per-user event counts (int32 user codes, ``bincount``) give the partitions:
   contiguous ranges of user codes of at most ``part_events`` events each;
3. **scatter**: each batch's rows, as (user code int32, item code int32, time int64), are
   appended to their partition's files on disk in file order;
4. **per partition** (``utils/partition_sort.py``, in parallel worker processes: see
   :func:`sort_workers`): sort by (user, time), file order breaking ties (the ``stable``
   ordering); drop or refuse exact duplicate (user, item, time) rows (``data.duplicates``); drop
   users under ``data.min_user_interactions``; mark repeat events (the item occurred earlier in
   the user's sequence); the partitions' outputs are appended in user order;
5. **squeeze**: item codes no kept user has are removed (one pass over the output items).

Peak host memory is one partition's sort per worker (about 40-50 B per event of the partition:
E = 2^26 by default, about 3 GB; the workers' count bounds the sum) plus O(U + I) id arrays; disk holds the partitions (16 B per row) until
they are consumed. The cache folder holds flat binary arrays (``offsets.int64``,
``items.int32``, ``timestamps.int64``, ``repeats.bool``) that :func:`load_columnar` maps
into memory, Parquet raw-id tables, ``meta.json`` and a manifest (sha256 of the small files,
byte sizes of the arrays: hashing tens of GB at every load would cost more than the load).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa  # type: ignore[import-untyped]
import pyarrow.compute as pc  # type: ignore[import-untyped]
import pyarrow.dataset as pads  # type: ignore[import-untyped]

from ..utils.integrity import verify_manifest, write_manifest
from ..utils.runinfo import temp_dir_beside
from .prepared import PreparedDataset, _remove_stale
from .table import DataError, millis_note, millis_to_seconds, plain

log = logging.getLogger(__name__)

ARRAYS = {"offsets": np.int64, "items": np.int32, "timestamps": np.int64, "repeats": np.bool_}
AUTO_ROWS = 50_000_000  # data.engine=auto: columnar for a Parquet input over this many rows
PART_EVENTS = 1 << 26
BATCH_ROWS = 1 << 22
_BITMAP_MAX = 1 << 31  # id value ranges up to this use a bitmap (bytes = range)


def _is_parquet(p: Path) -> bool:
    with open(p, "rb") as f:
        return f.read(4) == b"PAR1"


def _parquet_input(path: Path) -> pads.Dataset | None:
    """The Parquet dataset at ``path`` (a file or a folder of parts), or None when it is not one."""
    p = Path(path)
    try:
        if p.is_dir():
            parts = [f for f in sorted(p.rglob("*")) if f.is_file() and not f.name.startswith((".", "_")) and f.suffix != ".crc"]
            if not parts or not _is_parquet(parts[0]):
                return None
            return pads.dataset([str(f) for f in parts], format="parquet")
        if not _is_parquet(p):
            return None
        return pads.dataset(str(p), format="parquet")
    except (OSError, pa.ArrowException):
        return None


def unsupported(cfg: Any) -> list[str]:
    """The settings of ``cfg`` (a DataConfig) the columnar engine does not implement."""
    out = []
    if cfg.ordering != "stable":
        out.append(f"data.ordering={cfg.ordering}")
    if cfg.min_rating is not None:
        out.append("data.min_rating")
    if cfg.behavior is not None:
        out.append("data.behavior")
    if cfg.repeats != "keep":
        out.append(f"data.repeats={cfg.repeats}")
    if cfg.format not in ("auto", "table"):
        out.append(f"data.format={cfg.format}")
    return out


def choose(cfg: Any, path: Path | None) -> bool:
    """Whether ``cfg`` (a DataConfig) prepares with the columnar engine: ``data.engine``, or
    for ``auto`` a Parquet input over :data:`AUTO_ROWS` rows that needs nothing it lacks."""
    if cfg.engine not in ("auto", "memory", "columnar"):
        raise DataError(f"data.engine={cfg.engine!r} is not one of auto, memory, columnar")
    if cfg.engine == "memory":
        return False
    ds = _parquet_input(path) if path is not None else None
    if cfg.engine == "columnar":
        if ds is None:
            raise DataError(
                f"data.engine=columnar reads Parquet (a file or a folder of parts), and {path or cfg.name} is not Parquet; "
                "convert it (e.g. pandas.read_csv(...).to_parquet(...)) or use data.engine=memory"
            )
        if unsupported(cfg):
            raise DataError(f"data.engine=columnar does not implement {', '.join(unsupported(cfg))}; use data.engine=memory")
        return True
    return ds is not None and not unsupported(cfg) and ds.count_rows() > AUTO_ROWS


# --------------------------------------------------------------------------- passes


class _Ids:
    """Distinct integer ids seen over the batches (pass 1), then their codes (pass 2+):
    sorted order, code 0..n-1."""

    def __init__(self, what: str, column: str, source: str):
        self.what, self.column, self.source = what, column, source
        self.lo = 0
        self.bitmap: np.ndarray | None = None
        self.parts: list[np.ndarray] = []
        self.values: np.ndarray | None = None
        self._lookup: np.ndarray | None = None

    def add(self, v: np.ndarray) -> None:
        if len(v) == 0:
            return
        if self.parts:  # sparse id range: sorted uniques per batch, merged at the end
            self.parts.append(np.unique(v))
            return
        lo, hi = int(v.min()), int(v.max())
        if self.bitmap is not None:
            lo, hi = min(lo, self.lo), max(hi, self.lo + len(self.bitmap) - 1)
        if hi - lo + 1 > _BITMAP_MAX:
            if self.bitmap is not None:
                self.parts.append(np.flatnonzero(self.bitmap) + self.lo)
                self.bitmap = None
            self.parts.append(np.unique(v))
            return
        if self.bitmap is None or lo < self.lo or hi >= self.lo + len(self.bitmap):
            grown = np.zeros(hi - lo + 1, dtype=bool)
            if self.bitmap is not None:
                grown[self.lo - lo : self.lo - lo + len(self.bitmap)] = self.bitmap
            self.bitmap, self.lo = grown, lo
        self.bitmap[v - self.lo] = True

    def finish(self) -> np.ndarray:
        if self.parts:
            if self.bitmap is not None:
                self.parts.append(np.flatnonzero(self.bitmap) + self.lo)
            self.values = np.unique(np.concatenate(self.parts))
            self.parts, self.bitmap = [], None
        else:
            assert self.bitmap is not None
            self.values = np.flatnonzero(self.bitmap).astype(np.int64) + self.lo
            if len(self.bitmap) <= 4 * len(self.values) + (1 << 20):  # dense range: a direct lookup table
                self._lookup = (np.cumsum(self.bitmap, dtype=np.int64) - 1).astype(np.int32)
            self.bitmap = None
        if len(self.values) >= 2**31:
            raise DataError(f"{self.source}: {len(self.values):,} distinct {self.what} ids; the columnar engine handles under 2^31")
        return self.values

    def codes(self, v: np.ndarray) -> np.ndarray:
        assert self.values is not None
        if self._lookup is not None:
            return self._lookup[v - self.values[0]]
        return np.searchsorted(self.values, v).astype(np.int32)


def _batches(ds: pads.Dataset, cols: list[str], batch_rows: int):
    # little read-ahead: Arrow's default buffers up to 16 batches of 4 fragments (GBs at this batch size)
    for b in ds.to_batches(columns=cols, batch_size=batch_rows, batch_readahead=1, fragment_readahead=1):
        if b.num_rows:
            yield b


def _int_column(b: pa.RecordBatch, name: str, what: str, source: str) -> np.ndarray:
    col = b.column(name)
    if col.null_count:
        raise DataError(f"{source}: {col.null_count:,} row(s) have an empty {what} id in column {name!r}; drop or fill them")
    if not pa.types.is_integer(col.type):
        raise DataError(
            f"{source}: column {name!r} ({what} ids) is {col.type}; data.engine=columnar needs integer ids "
            "(map them to integers first, or use data.engine=memory)"
        )
    return col.to_numpy().astype(np.int64, copy=False)


def _time_column(b: pa.RecordBatch, name: str | None, source: str, first_row: int) -> np.ndarray:
    """A batch's times as the file holds them (checked), or the file positions without a time column."""
    if name is None:  # no time column: the position in the file is the time (as the memory engine)
        return np.arange(first_row, first_row + b.num_rows, dtype=np.int64)
    col = b.column(name)
    if col.null_count:
        raise DataError(f"{source}: timestamp column {name!r} is empty in {col.null_count:,} row(s); fill them or --set data.time_col=none")
    if pa.types.is_timestamp(col.type):
        return pc.cast(col, pa.timestamp("s")).cast(pa.int64()).to_numpy()
    if not (pa.types.is_integer(col.type) or pa.types.is_floating(col.type)):
        raise DataError(f"{source}: timestamp column {name!r} is {col.type}; give unix times as numbers, or --set data.time_col=none")
    t = np.floor(col.to_numpy().astype(np.float64)).astype(np.int64) if pa.types.is_floating(col.type) else col.to_numpy().astype(np.int64)
    if len(t) and t.min() < 0:
        raise DataError(f"{source}: timestamp column {name!r} has a negative value ({plain(t.min())}); timestamps must be unix times >= 0")
    return t


def sort_workers(partitions: int) -> int:
    """Processes for the sort pass: ``FUXI_MME_PREPARE_WORKERS`` when set, else as many as the
    partitions, the usable cores (up to 8) and the available memory (about 6 GB each at the
    default partition size; a container's memory limit counts) allow."""
    env = os.environ.get("FUXI_MME_PREPARE_WORKERS")
    if env:
        try:
            return max(1, min(int(env), partitions))
        except ValueError:
            raise DataError(f"FUXI_MME_PREPARE_WORKERS={env!r} is not a whole number; set it to the number of sort processes (1 = none)") from None
    per_worker = 6e9 * PART_EVENTS / (1 << 26)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(partitions, cores, 8, int(_available_memory(per_worker) // per_worker)))


def _available_memory(default: float) -> float:
    """Bytes the host can still give: MemAvailable, capped by the cgroup (container) limit."""
    avail = None
    try:
        with open("/proc/meminfo") as f:
            avail = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        pass
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            left = int(limit) - used
            avail = left if avail is None else min(avail, left)
    except (OSError, ValueError):
        pass
    return float(default if avail is None else avail)


def _map_partitions(jobs: list[tuple], workers: int):
    """``sort_partition`` over ``jobs``, results in partition order: inline with one worker,
    else in that many spawned processes (the partitions are independent). A result is dropped
    as soon as it is handed over; a worker that dies (out of memory, killed) is a one-line error."""
    from ..utils.partition_sort import sort_partition

    if workers <= 1:
        yield from (sort_partition(*j) for j in jobs)
        return
    import multiprocessing as mp
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn")) as pool:
        futures: list[Any] = [pool.submit(sort_partition, *j) for j in jobs]
        try:
            for k in range(len(futures)):
                try:
                    res = futures[k].result()
                except BrokenProcessPool:
                    raise DataError(
                        f"a sorting process of the preparation died (out of memory, or killed) with {workers} at once; "
                        "set FUXI_MME_PREPARE_WORKERS to fewer (1 = none) and run the command again"
                    ) from None
                futures[k] = None  # each partition's result held only until it is appended
                yield res
        finally:
            for fut in futures:
                if fut is not None:
                    fut.cancel()


def prepare_columnar(
    path: Path,
    cfg: Any,
    name: str,
    folder: Path,
    meta: dict[str, Any],
    duplicates: str,
    min_user_interactions: int,
    part_events: int | None = None,
    batch_rows: int | None = None,
    log_notes: bool = True,
) -> None:
    """Prepare the Parquet input ``path`` into the cache folder ``folder`` (written to a
    temporary sibling and renamed into place). ``duplicates`` is keep, drop or error; its notes
    are logged unless ``log_notes`` is False (they are in the stats either way)."""
    source = str(path)
    part_events = part_events or PART_EVENTS  # read at call time (tests shrink them)
    batch_rows = batch_rows or BATCH_ROWS
    data = _parquet_input(path)
    if data is None:
        raise DataError(f"{source} is not Parquet (a file or a folder of parts); data.engine=columnar reads only Parquet")
    names = set(data.schema.names)
    cols = [cfg.user_col, cfg.item_col] + ([cfg.time_col] if cfg.time_col else [])
    for role, c in zip(("user", "item", "timestamp"), cols):
        if c not in names:
            raise DataError(
                f"{source} has no column {c!r} for the {role} (columns: {', '.join(data.schema.names)}); "
                f"name the right one with --set data.{'time' if role == 'timestamp' else role}_col=NAME"
            )
    folder.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale(folder)
    tmp = temp_dir_beside(folder)
    clock: dict[str, float] = {}
    try:
        t0 = time.perf_counter()
        users, items = _Ids("user", cfg.user_col, source), _Ids("item", cfg.item_col, source)
        rows = 0
        for b in _batches(data, cols, batch_rows):  # pass 1: distinct ids (and the columns' checks)
            users.add(_int_column(b, cfg.user_col, "user", source))
            items.add(_int_column(b, cfg.item_col, "item", source))
            _time_column(b, cfg.time_col, source, rows)
            rows += b.num_rows
        if rows == 0:
            raise DataError(f"{source} holds no interactions (empty table)")
        user_raw, item_raw = users.finish(), items.finish()
        clock["distinct_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        counts = np.zeros(len(user_raw), dtype=np.int64)  # pass 2: events per user -> partitions
        for b in _batches(data, [cfg.user_col], batch_rows):
            counts += np.bincount(users.codes(_int_column(b, cfg.user_col, "user", source)), minlength=len(user_raw))
        cum = np.cumsum(counts)
        bounds = [0]  # partition p holds user codes bounds[p] .. bounds[p+1]-1
        while bounds[-1] < len(user_raw):
            done = cum[bounds[-1] - 1] if bounds[-1] else 0
            nxt = int(np.searchsorted(cum, done + part_events, side="right"))
            bounds.append(max(nxt, bounds[-1] + 1))  # a user larger than a partition gets one alone
        part_of = np.repeat(np.arange(len(bounds) - 1, dtype=np.int32), np.diff(bounds))
        clock["count_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()  # pass 3: scatter rows to partition files, file order kept
        parts_dir = tmp / "partitions"
        parts_dir.mkdir()
        files = [{k: open(parts_dir / f"{p}.{k}", "wb") for k in ("u", "i", "t")} for p in range(len(bounds) - 1)]
        seen = millis = 0
        try:
            for b in _batches(data, cols, batch_rows):
                u = users.codes(_int_column(b, cfg.user_col, "user", source))
                i = items.codes(_int_column(b, cfg.item_col, "item", source))
                t, n_ms = millis_to_seconds(_time_column(b, cfg.time_col, source, seen))  # the readers' rule
                millis += n_ms
                seen += b.num_rows
                p = part_of[u]
                order = np.argsort(p, kind="stable")
                edges = np.searchsorted(p[order], np.arange(len(files) + 1))
                for q in np.flatnonzero(np.diff(edges)):
                    sel = order[edges[q] : edges[q + 1]]
                    u[sel].tofile(files[q]["u"])
                    i[sel].tofile(files[q]["i"])
                    t[sel].tofile(files[q]["t"])
        finally:
            for f in files:
                for h in f.values():
                    h.close()
        del part_of, u, i, t, p, order, b
        pa.default_memory_pool().release_unused()  # Arrow keeps freed batch memory in its pool
        clock["scatter_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()  # pass 4: per partition, sort, dedup, filter, repeats (in parallel)
        jobs = [
            (str(parts_dir), p, bounds[p], bounds[p + 1], len(item_raw), cfg.time_col is not None, duplicates, min_user_interactions)
            for p in range(len(bounds) - 1)
        ]
        workers = sort_workers(len(jobs))

        kept_users: list[np.ndarray] = []
        kept_counts: list[np.ndarray] = []
        present = np.zeros(len(item_raw), dtype=bool)
        dropped = {"duplicates": 0, "users": 0, "user_events": 0}
        t_min, t_max = None, None
        out = {k: open(tmp / f"{k}.{np.dtype(dt).name}", "wb") for k, dt in ARRAYS.items() if k != "offsets"}
        results = _map_partitions(jobs, workers)
        try:
            for r in results:
                if r["duplicate"] is not None:
                    u_, i_, t_ = r["duplicate"]
                    raise DataError(
                        f"{source}: row(s) repeat an earlier (user, item, timestamp) exactly, e.g. user {plain(user_raw[u_])}, "
                        f"item {plain(item_raw[i_])}, timestamp {plain(t_)}; this usually means a file was concatenated twice. "
                        "Fix the file, or pass --set data.duplicates=drop (or keep)"
                    )
                for k, v in r["dropped"].items():
                    dropped[k] += v
                kept_users.append(r["kept_users"])
                kept_counts.append(r["counts"])
                present[r["items_present"]] = True
                if r["t_min"] is not None:
                    t_min = r["t_min"] if t_min is None else min(t_min, r["t_min"])
                    t_max = r["t_max"] if t_max is None else max(t_max, r["t_max"])
                for k, h in out.items():  # the partition's sorted columns, appended in partition order
                    part = parts_dir / f"{r['part']}.{k}"
                    with open(part, "rb") as src:
                        shutil.copyfileobj(src, h, 1 << 24)
                    os.remove(part)
        finally:
            results.close()  # on an error: pending partitions cancelled, running ones awaited
            for h in out.values():
                h.close()
        shutil.rmtree(parts_dir, ignore_errors=True)
        clock["sort_s"] = time.perf_counter() - t0

        t0 = time.perf_counter()
        uk, nk = np.concatenate(kept_users), np.concatenate(kept_counts)
        if len(uk) == 0:
            raise DataError(
                f"{source}: no user has at least {min_user_interactions} interactions after filtering; "
                "a sequential recommender needs at least 2 per user (check the user column and filters)"
            )
        offsets = np.zeros(len(uk) + 1, dtype=np.int64)
        np.cumsum(nk, out=offsets[1:])
        offsets.tofile(tmp / "offsets.int64")
        nnz = int(offsets[-1])
        if not present.all():  # pass 5: squeeze out items no kept user has; ids become 1..I
            remap = (np.cumsum(present, dtype=np.int64)).astype(np.int32)
        else:
            remap = np.arange(1, len(item_raw) + 1, dtype=np.int32)
        mm = np.memmap(tmp / "items.int32", dtype=np.int32, mode="r+", shape=(nnz,)) if nnz else np.zeros(0, np.int32)
        for s in range(0, nnz, 1 << 26):
            mm[s : s + (1 << 26)] = remap[mm[s : s + (1 << 26)]]
        if isinstance(mm, np.memmap):
            mm.flush()
        del mm
        item_kept = item_raw[present]
        clock["squeeze_s"] = time.perf_counter() - t0

        lens = np.diff(offsets)
        has_ts = cfg.time_col is not None
        notes = [millis_note(source, millis)] if millis else []
        if dropped["duplicates"]:
            notes.append(f"dropped {dropped['duplicates']:,} exact duplicate (user, item, timestamp) rows")
        if dropped["users"]:
            notes.append(
                f"dropped {dropped['users']:,} user(s) with fewer than {min_user_interactions} interactions ({dropped['user_events']:,} interactions)"
            )
        stats: dict[str, Any] = {
            "users": len(uk),
            "items": len(item_kept),
            "interactions": nnz,
            "seq_len_mean": float(lens.mean()),
            "seq_len_percentiles": {str(q): float(np.percentile(lens, q)) for q in (0, 25, 50, 75, 90, 99, 100)},
            "has_timestamps": has_ts,
            "notes": notes,
        }
        if has_ts and t_min is not None and t_max is not None:
            stats.update(time_min=t_min, time_max=t_max, time_span_days=(t_max - t_min) / 86400.0)
        pa_write({"raw_id": np.concatenate([item_kept[:1], item_kept])}, tmp / "items.parquet")
        pa_write({"raw_id": user_raw[uk]}, tmp / "users.parquet")
        full = {**meta, "name": name, "engine": "columnar", "has_timestamps": has_ts, "stats": stats, "rows_read": rows, "prepare": clock}
        full["partitions"] = len(bounds) - 1
        full["sort_workers"] = workers
        (tmp / "meta.json").write_text(json.dumps(full, indent=2, default=str))
        arrays = [f"{k}.{np.dtype(dt).name}" for k, dt in ARRAYS.items()]
        write_manifest(tmp, sorted(f.name for f in tmp.iterdir() if f.suffix in (".json", ".parquet")), sized=arrays)
        old = tmp.with_name(tmp.name.replace(".tmp-", ".old-"))
        try:
            os.rename(folder, old)
        except FileNotFoundError:
            pass
        os.rename(tmp, folder)
        shutil.rmtree(old, ignore_errors=True)
        for n_ in notes if log_notes else []:
            log.info("%s: %s", name, n_)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def pa_write(cols: dict[str, np.ndarray], path: Path) -> None:
    import pyarrow.parquet as pq  # type: ignore[import-untyped]

    pq.write_table(pa.table({k: pa.array(v) for k, v in cols.items()}), path)


def is_columnar(folder: Path) -> bool:
    return (folder / "items.int32").exists()


def load_columnar(folder: Path) -> PreparedDataset:
    """A columnar cache folder, its arrays memory-mapped (read-only). Raises on damage (a
    changed small file, an array of the wrong size, inconsistent offsets): the caller rebuilds."""
    import pandas as pd

    verify_manifest(folder, required=True)  # sha256 of the small files, byte sizes of the arrays
    meta = json.loads((folder / "meta.json").read_text())
    arr = {}
    for k, dt in ARRAYS.items():
        f = folder / f"{k}.{np.dtype(dt).name}"
        n = f.stat().st_size // np.dtype(dt).itemsize
        arr[k] = np.memmap(f, dtype=dt, mode="r", shape=(n,)) if n else np.zeros(0, dtype=dt)
    ds = PreparedDataset(
        name=meta["name"],
        offsets=np.asarray(arr["offsets"]),
        items=arr["items"],
        timestamps=arr["timestamps"],
        item_raw=pd.read_parquet(folder / "items.parquet")["raw_id"].to_numpy(),
        user_raw=pd.read_parquet(folder / "users.parquet")["raw_id"].to_numpy(),
        has_timestamps=bool(meta["has_timestamps"]),
        stats=meta["stats"],
        cache_dir=str(folder),
    )
    ds.__dict__["_repeat_flags"] = arr["repeats"]
    n, U = len(ds.items), ds.num_users
    if not (
        ds.offsets[0] == 0
        and ds.offsets[-1] == n
        and len(ds.timestamps) == n
        and len(arr["repeats"]) == n
        and len(ds.user_raw) == U
        and ds.stats.get("interactions") == n
        and ds.stats.get("users") == U
        and ds.stats.get("items") == ds.num_items
    ):
        raise DataError(f"cached dataset {folder} is inconsistent (sequence offsets, ids or statistics disagree)")
    return ds

"""Per-epoch logs of a suite's runs, packed into one archive per suite folder.

A finished run's ``config.json``, ``run.json`` and ``metrics.json`` go into the suite's
``runs.jsonl`` (:mod:`.store`). Its per-epoch files (``metrics.jsonl``, ``tensorboard/``) and the runner's ``seed<k>.log`` go into
``<root>/<suite>/logs.tar.xz``, under their paths relative to the suite folder. The tables need
one figure from those logs, a run's training seconds: :func:`pack_logs` keeps it in
``<root>/<suite>/train_seconds.json``, so aggregating never opens the archive.

Stored compactly, with nothing lost:

* a ``metrics.jsonl`` goes into the archive as ``metrics.columns.json`` (:func:`encode_columns`):
  its records column by column, each column as written or, where that gives back every value
  bit for bit, as float32 text, as integers over a divisor (HR@K = hits / users, seq/s =
  sequences / seconds, GiB = bytes / 2**30) or as differences; :func:`log_text` gives back the
  file byte for byte (a log the encoding cannot give back exactly stays as it was);
* a run copied from another suite (its ``metrics.json`` names the other run's folder as
  ``run_dir`` and equals that run's) keeps no log of its own when it is the same as that run's:
  :func:`log_text` reads the other run's;
* packing also moves each run's ``config.json``, ``run.json`` and ``metrics.json`` into the
  suite's ``runs.jsonl`` (:func:`.store.pack_runs`), so a packed suite is a few files, not a
  folder per run.
"""

from __future__ import annotations

import io
import json
import logging
import lzma
import math
import shutil
import struct
import tarfile
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np

from ..utils.locks import held, in_use
from ..utils.runinfo import atomic_write_json, atomic_write_text
from .store import RUN_DEPTH, has_run_file, pack_runs, run_file

log = logging.getLogger(__name__)

ARCHIVE = "logs.tar.xz"
TRAIN_SECONDS = "train_seconds.json"
LOG = "metrics.jsonl"
COLUMNS = "metrics.columns.json"
COLUMNS_FORMAT = "fuxi-mme/metrics-columns/1"
GIB = 2**30


def parse_records(text: str, where: str) -> list[dict[str, Any]]:
    """The JSON lines of a ``metrics.jsonl``; a line that is not JSON (an interrupted write) is
    skipped with a warning naming it."""
    records = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            log.warning("%s line %d is not JSON (an interrupted write?); skipped", where, n)
    return records


def sum_train_seconds(records: list[dict[str, Any]]) -> float | None:
    """The sum of the train records' epoch seconds; None when the log lacks its first epochs
    (its earlier records were lost), where the sum would understate the run."""
    train = [r for r in records if r.get("kind") == "train"]
    if train and int(train[0].get("epoch", 1)) > 1:
        return None
    return float(sum(r.get("epoch_seconds", 0.0) for r in train))


def _suite_dir(run_dir: Path) -> Path:
    return run_dir.parents[RUN_DEPTH - 1]


def _member(run_dir: Path) -> str:
    return run_dir.relative_to(_suite_dir(run_dir)).as_posix()


def train_seconds(run_dir: Path) -> float | None:
    """A run's training time (the sum of its epochs' seconds): from its own ``metrics.jsonl``
    when it is still there, else from its suite's ``train_seconds.json``; None if neither has it."""
    f = run_dir / "metrics.jsonl"
    if f.exists():
        return sum_train_seconds(parse_records(f.read_text(), str(f)))
    info = run_file(run_dir, "run.json")
    if isinstance(info, dict) and "reused_from" in info:  # a reused run records its source's
        value = info.get("train_seconds")
        return float(value) if isinstance(value, (int, float)) else None
    if len(run_dir.parents) < RUN_DEPTH:
        return None
    index = _suite_dir(run_dir) / TRAIN_SECONDS
    if not index.exists():
        return None
    return json.loads(index.read_text()).get(_member(run_dir))


def source_snapshot(src: Path, root: Path) -> dict[str, Any] | None:
    """What a reused run takes from ``src`` (another suite's run of the same training,
    :func:`.plan.reusable_run`), read once, before anything is moved: its three run files, its
    per-epoch log where it can be read, its training seconds and its name under ``root``;
    None when a run file is missing (the source changed since it was chosen)."""
    files = {name: run_file(src, name) for name in ("config.json", "run.json", "metrics.json")}
    if any(not isinstance(v, dict) for v in files.values()):
        return None
    return {**files, "log": log_text(src), "seconds": train_seconds(src), "name": src.relative_to(root).as_posix()}


def write_copy(snap: dict[str, Any], dst: Path) -> None:
    """Make ``dst`` a finished run with a :func:`source_snapshot`'s results, standing on its own:
    ``config.json`` as it was, ``metrics.json`` with ``run_dir`` naming ``dst``, ``run.json``
    with ``reused_from`` and the source's training seconds, and the source's per-epoch log as
    ``dst``'s own ``metrics.jsonl`` (empty where it could not be read, so that no older log of
    ``dst``'s name in the suite's archive stands in for it). ``metrics.json`` is written last:
    it marks the run finished."""
    dst.mkdir(parents=True, exist_ok=True)
    atomic_write_text(dst / LOG, snap["log"] or "")
    atomic_write_json(dst / "config.json", snap["config.json"])
    atomic_write_json(dst / "run.json", {**snap["run.json"], "reused_from": snap["name"], "train_seconds": snap["seconds"]})
    atomic_write_json(dst / "metrics.json", {**snap["metrics.json"], "run_dir": str(dst)})


def _member_text(archive: Path, run: str) -> str | None:
    """The ``metrics.jsonl`` text of member folder ``run`` of ``archive``, stored plain or as columns."""
    with tarfile.open(archive, "r:xz") as tar:
        for name in (f"{run}/{LOG}", f"{run}/{COLUMNS}"):
            try:
                data = tar.extractfile(name)
            except KeyError:
                continue
            if data is not None:
                text = data.read().decode()
                return text if name.endswith(LOG) else decode_columns(json.loads(text))
    return None


def copy_source(run_dir: Path, warn: bool = False) -> Path | None:
    """The run a copied run was copied from: the folder its ``metrics.json`` names as ``run_dir``,
    under the same results root, when that is another folder whose ``metrics.json`` is the same."""
    mine = run_file(run_dir, "metrics.json") if len(run_dir.parents) >= RUN_DEPTH + 1 else None
    if mine is None:
        return None
    recorded = mine.get("run_dir") if isinstance(mine, dict) else None
    if not recorded or len(Path(recorded).parts) < RUN_DEPTH + 1:
        return None
    src = _suite_dir(run_dir).parent.joinpath(*Path(recorded).parts[-(RUN_DEPTH + 1) :])
    if src == run_dir or not has_run_file(src, "metrics.json"):
        return None
    if run_file(src, "metrics.json") != mine:
        if warn:
            log.warning("%s was copied from %s, whose metrics.json has changed since; its per-epoch log is not read from there", run_dir, src)
        return None
    return src


def log_text(run_dir: Path, _seen: frozenset[Path] = frozenset()) -> str | None:
    """A run's ``metrics.jsonl`` byte for byte: the loose file, else its copy in the archive of
    the suite folder above it, else (a run copied from another suite's run) that run's; None
    when there is none."""
    f = run_dir / LOG
    if f.is_file():
        return f.read_text()
    if len(run_dir.parents) < RUN_DEPTH:
        return None
    archive = _suite_dir(run_dir) / ARCHIVE
    text = _member_text(archive, _member(run_dir)) if archive.is_file() else None
    if text is None and run_dir not in _seen:
        src = copy_source(run_dir, warn=True)
        if src is not None:
            text = log_text(src, _seen | {run_dir})
    return text


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's per-epoch records (:func:`log_text`); empty when there are none."""
    text = log_text(run_dir)
    return parse_records(text, str(run_dir / LOG)) if text is not None else []


# --- metrics.jsonl column by column -------------------------------------------------------


def _shape(v: Any) -> Any:
    """A record's skeleton: its keys and nesting, each value replaced by its JSON type."""
    if isinstance(v, dict):
        return {k: _shape(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_shape(x) for x in v]
    return {bool: "b", int: "i", float: "f", str: "s", type(None): "n"}[type(v)]


def _leaves(v: Any, path: tuple[Any, ...] = ()) -> Any:
    if isinstance(v, dict):
        for k, x in v.items():
            yield from _leaves(x, (*path, k))
    elif isinstance(v, list):
        for i, x in enumerate(v):
            yield from _leaves(x, (*path, i))
    else:
        yield path, v


def _bits(x: float) -> bytes:
    return struct.pack("<d", x)


def _diffs(xs: list[int]) -> list[int]:
    return xs[:1] + [b - a for a, b in zip(xs, xs[1:], strict=False)]


def _sums(xs: list[int]) -> list[int]:
    out: list[int] = []
    for x in xs:
        out.append(x + out[-1] if out else x)
    return out


def _float32(vals: list[float]) -> list[str] | None:
    """The shortest float32 text of each value, when each is a float32 and reads back exactly."""
    out = []
    for v in vals:
        if not math.isfinite(v):
            return None
        s = str(np.float32(v))
        if _bits(float(np.float32(s))) != _bits(v):
            return None
        out.append(s)
    return out


def _over(vals: list[float], divisors: list[Any]) -> list[int] | None:
    """Integers k with k / d == v bit for bit for each value v and divisor d, if there are such."""
    out = []
    for v, d in zip(vals, divisors, strict=True):
        if not math.isfinite(v) or isinstance(d, bool) or not d or not math.isfinite(d) or abs(v * d) >= 2**53:
            return None
        k = round(v * d)
        if _bits(k / d) != _bits(v):
            return None
        out.append(k)
    return out


def _encode_shape(cols: dict[tuple[Any, ...], list[Any]]) -> list[list[Any]]:
    """Each column of one record shape as ``[path, how, data]``: how is "raw", "diff" (integers
    as differences), "f32" (float32 text) or ``["div", path or GIB]`` (integers, as differences,
    over the divisor column or constant); the shortest text that gives the values back exactly."""
    out, divided, divisors = [], set(), set()
    for p, vals in cols.items():
        how: Any = "raw"
        data: list[Any] = vals
        if all(type(v) is int for v in vals):
            how, data = "diff", _diffs(vals)
        elif all(type(v) is float for v in vals):
            cands: list[tuple[Any, list[Any]]] = []
            f32 = _float32(vals)
            if f32 is not None:
                cands.append(("f32", f32))
            if p not in divisors:
                others = [(list(q), c) for q, c in cols.items() if q != p and q not in divided and all(type(x) in (int, float) for x in c)]
                for q, c in [*others, (GIB, [GIB] * len(vals))]:
                    ks = _over(vals, c)
                    if ks is not None:
                        cands.append((["div", q], _diffs(ks)))
            if cands:
                how, data = min(cands, key=lambda c: len(json.dumps(c[1])))
                if isinstance(how, list):
                    divided.add(p)
                    if isinstance(how[1], list):
                        divisors.add(tuple(how[1]))
        out.append([list(p), how, data])
    return out


def encode_columns(text: str) -> dict[str, Any] | None:
    """A ``metrics.jsonl`` column by column (see the module notes); None when the text is not
    one ``json.dumps`` line per record or the encoding would not give it back byte for byte."""
    if not text.endswith("\n"):
        return None
    try:
        records = [json.loads(line) for line in text.split("\n")[:-1]]
    except json.JSONDecodeError:
        return None
    if any(not isinstance(r, dict) for r in records) or "".join(json.dumps(r) + "\n" for r in records) != text:
        return None
    shapes: list[Any] = []
    index: dict[str, int] = {}
    lines: list[int] = []
    cols: list[dict[tuple[Any, ...], list[Any]]] = []
    for r in records:
        shape = _shape(r)
        key = json.dumps(shape)
        if key not in index:
            index[key] = len(shapes)
            shapes.append(shape)
            cols.append({})
        lines.append(index[key])
        for p, v in _leaves(r):
            cols[index[key]].setdefault(p, []).append(v)
    doc = {"format": COLUMNS_FORMAT, "shapes": shapes, "lines": lines, "columns": [_encode_shape(c) for c in cols]}
    try:
        ok = decode_columns(json.loads(json.dumps(doc))) == text
    except (KeyError, TypeError, ValueError, IndexError):
        ok = False
    return doc if ok else None


def decode_columns(doc: dict[str, Any]) -> str:
    """The ``metrics.jsonl`` text that :func:`encode_columns` encoded."""
    if doc.get("format") != COLUMNS_FORMAT:
        raise ValueError(f"not a {COLUMNS_FORMAT} document: {doc.get('format')!r}")
    values: list[dict[tuple[Any, ...], list[Any]]] = []
    for columns in doc["columns"]:
        vals: dict[tuple[Any, ...], list[Any]] = {}
        for p, how, data in columns:
            if how == "raw":
                vals[tuple(p)] = data
            elif how == "diff":
                vals[tuple(p)] = _sums(data)
            elif how == "f32":
                vals[tuple(p)] = [float(np.float32(s)) for s in data]
        for p, how, data in columns:
            if isinstance(how, list):
                divisors = [how[1]] * len(data) if not isinstance(how[1], list) else vals[tuple(how[1])]
                vals[tuple(p)] = [k / d for k, d in zip(_sums(data), divisors, strict=True)]
        values.append(vals)

    def build(shape: Any, s: int, n: int, path: tuple[Any, ...] = ()) -> Any:
        if isinstance(shape, dict):
            return {k: build(x, s, n, (*path, k)) for k, x in shape.items()}
        if isinstance(shape, list):
            return [build(x, s, n, (*path, i)) for i, x in enumerate(shape)]
        return values[s][path][n]

    seen = [0] * len(doc["shapes"])
    out = []
    for s in doc["lines"]:
        out.append(json.dumps(build(doc["shapes"][s], s, seen[s])) + "\n")
        seen[s] += 1
    return "".join(out)


def _run_of(path: Path, suite_dir: Path) -> str:
    """The run (``<dataset>/<variant>/seed<k>``) a file under a suite folder belongs to."""
    parts = path.relative_to(suite_dir).parts
    return "/".join([*parts[:2], parts[2].removesuffix(".log")])


def busy_runs(suite_dir: Path) -> set[str]:
    """The runs under a suite folder that a process is still writing: a training holds its run
    folder's lock, the runner its ``seed<k>.log``'s (``utils/locks.py``)."""
    held = [p for p in suite_dir.glob("*/*/*") if p.is_dir() or p.suffix == ".log"]
    return {_run_of(p, suite_dir) for p in held if in_use(p)}


def loose_logs(suite_dir: Path, skip: Collection[str] = ()) -> list[Path]:
    """The per-epoch files under a suite folder: every ``metrics.jsonl``, the files of every
    ``tensorboard/`` folder and the runner's ``seed<k>.log`` files; those of the runs in
    ``skip`` left out."""
    files = [
        *suite_dir.glob("*/*/*/metrics.jsonl"),
        *suite_dir.glob("*/*/*.log"),
        *(p for p in suite_dir.glob("*/*/*/tensorboard/**/*") if p.is_file()),
    ]
    return sorted(p for p in files if _run_of(p, suite_dir) not in skip)


def _archived(archive: Path) -> dict[str, bytes]:
    """The archive's members, each run's log as its ``metrics.jsonl`` text however it is stored."""
    if not archive.exists():
        return {}
    out = {}
    with tarfile.open(archive, "r:xz") as tar:
        for m in tar.getmembers():
            if m.isfile():
                data = tar.extractfile(m).read()  # type: ignore[union-attr]  # a file member has data
                if m.name.endswith(f"/{COLUMNS}"):
                    out[m.name[: -len(COLUMNS)] + LOG] = decode_columns(json.loads(data)).encode()
                else:
                    out[m.name] = data
    return out


def _stored(suite_dir: Path, members: dict[str, bytes]) -> dict[str, bytes]:
    """The members as archived: a copied run's log left out when it is its source's, the other
    logs as columns where that gives them back exactly."""
    out = {}
    for name, data in members.items():
        if not name.endswith(f"/{LOG}"):
            out[name] = data
            continue
        run = name[: -len(LOG) - 1]
        src = copy_source(suite_dir / run)
        if src is not None:
            inside = src.parent.parent.parent == suite_dir
            theirs = members.get(f"{_member(src)}/{LOG}") if inside else (log_text(src) or "").encode()
            if theirs == data:
                continue
        doc = encode_columns(data.decode())
        if doc is None:
            out[name] = data
        else:
            out[f"{run}/{COLUMNS}"] = json.dumps(doc, separators=(",", ":")).encode()
    return out


def _write_archive(archive: Path, members: dict[str, bytes]) -> None:
    """Write ``members`` (sorted, no owners or times: the same logs give the same archive) to a
    temporary file, then move it over ``archive``."""
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w:xz", preset=9 | lzma.PRESET_EXTREME) as tar:  # type: ignore[call-overload]  # the stubs know presets 0-9 only
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(members[name]), 0o644
            tar.addfile(info, io.BytesIO(members[name]))
    tmp.replace(archive)


def pack_logs(suite_dir: Path, repack: bool = False, settle_s: float = 0.0) -> int:
    """Move a suite folder's loose per-epoch files into its ``logs.tar.xz`` (merged with what it
    holds; a loose file replaces its archived copy; stored as in the module notes), record each
    run's training seconds in ``train_seconds.json``, then move the runs' JSON files into its
    ``runs.jsonl`` (:func:`.store.pack_runs`). The loose files are deleted only after what holds
    them is written. ``repack``: rewrite the archive even when there is nothing loose. Returns
    the number of per-epoch files moved.

    Runs still being written (:func:`busy_runs`: another command's, started in the same suite
    folder) are left loose for a later packing; the suite folder's lock is held throughout, so
    two packings take turns and no runner starts a job meanwhile. ``settle_s``: wait up to that
    long for finished runs whose log is still held (a run's compile workers end a moment after
    it)."""
    with held(suite_dir, blocking=True):
        return _pack_logs(suite_dir, repack, settle_s)


def _pack_logs(suite_dir: Path, repack: bool, settle_s: float) -> int:
    busy = busy_runs(suite_dir)
    deadline = time.monotonic() + settle_s
    while any(has_run_file(suite_dir / r, "metrics.json") for r in busy) and time.monotonic() < deadline:
        time.sleep(0.5)
        busy = busy_runs(suite_dir)
    if busy:
        log.info("%s: %d run(s) still being written by another process, left loose: %s", suite_dir, len(busy), ", ".join(sorted(busy)))
    loose = loose_logs(suite_dir, busy)
    archive = suite_dir / ARCHIVE
    if loose or (repack and archive.is_file()):
        members = _archived(archive)
        members.update({p.relative_to(suite_dir).as_posix(): p.read_bytes() for p in loose})
        seconds = json.loads((suite_dir / TRAIN_SECONDS).read_text()) if (suite_dir / TRAIN_SECONDS).exists() else {}
        for name, data in members.items():
            if name.endswith(f"/{LOG}"):
                seconds[name[: -len(LOG) - 1]] = sum_train_seconds(parse_records(data.decode(), f"{archive}:{name}"))
        _write_archive(archive, _stored(suite_dir, members))
        atomic_write_json(suite_dir / TRAIN_SECONDS, dict(sorted(seconds.items())))
        for p in loose:
            p.unlink()
        for tb in {p for p in suite_dir.glob("*/*/*/tensorboard") if p.is_dir() and _run_of(p, suite_dir) not in busy}:
            shutil.rmtree(tb)
    pack_runs(suite_dir, busy)
    return len(loose)

"""Data pipeline: sources -> canonical table -> prepared sequences -> splits -> batches."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..config import DataConfig
from ..utils.runinfo import atomic_write_json
from . import demo
from .behaviors import attach_behavior, behavior_code
from .columnar import choose as choose_engine
from .columnar import is_columnar, load_columnar, prepare_columnar
from .download import Remote, fetch, is_archive, is_url, safe_extract
from .prepared import (
    PreparedDataset,
    build_prepared,
    cache_key,
    default_data_dir,
    file_fingerprint,
    load_prepared,
    save_prepared,
)
from .repeats import apply_repeats
from .sources import SOURCES, get_source, is_own_data, own_data_name
from .table import DataError, plain

log = logging.getLogger(__name__)

__all__ = [
    "DataError",
    "PreparedDataset",
    "find_run_source",
    "load_dataset",
    "measured_shape",
    "resolve_source_path",
    "SOURCES",
    "check_expected",
    "is_own_data",
    "own_data_name",
]


def raw_dir(cfg: DataConfig) -> Path:
    return Path(cfg.data_dir or default_data_dir()) / "raw" / cfg.name


def resolve_source_path(cfg: DataConfig, progress: bool = True) -> Path | None:
    """The local folder or file a named dataset is read from, downloading it when needed.

    ``cfg.path`` may be a folder, a plain or gzipped file, an archive (extracted safely into
    the raw folder) or a URL (downloaded there). Without it, ``<data_dir>/raw/<name>`` is
    used if present, else the dataset's official files are downloaded into it.
    """
    src = get_source(cfg.name)
    if not src.needs_files:
        return None
    own = is_own_data(cfg.name)
    raw = raw_dir(cfg)
    where = f" (or the extracted files into {raw})"
    if cfg.path and is_url(cfg.path):
        if own:
            raise DataError(f"{cfg.path}: your own data is read from a local file; download it first and pass its path with --source")
        return fetch([Remote(cfg.path)], raw, progress=progress, where_hint=where)
    if cfg.path:
        p = Path(cfg.path).expanduser()
        if not p.exists():
            raise DataError(f"{p} does not exist; pass the {'file' if own else 'dataset folder, file or archive'} with --source/--data-path")
        if p.is_file() and is_archive(p) and not own:
            return _extract_source(p, raw)
        return p
    if cfg.name == "file":
        return None  # the reader raises the clear error
    if not own and raw.exists() and any(not f.name.startswith(".") for f in raw.iterdir()):
        return raw
    remembered = _remembered_source(cfg)
    if remembered is not None:
        log.info("%s: using %s, the --source it was prepared from before", cfg.name, remembered)
        return remembered
    if own and cfg.name != cfg.name.lower() and _remembered_source(dataclasses.replace(cfg, name=cfg.name.lower())) is not None:
        raise DataError(f"unknown dataset {cfg.name!r}; own data is known by its file's stem in lower case: {cfg.name.lower()!r}")
    if own:
        raise DataError(
            f"unknown dataset {cfg.name!r}: not a named dataset ({', '.join(n for n in SOURCES if n != 'file')}, amazon-<category>) "
            "and nothing was prepared under this name; for your own data pass --source FILE (and --name NAME to reuse it later)"
        )
    if src.remotes:
        log.warning("%s is not in %s; downloading it from %s (licence: %s)", cfg.name, raw, src.remotes[0].url, src.licence)
        return fetch(src.remotes, raw, progress=progress, where_hint=where)
    raise DataError(f"dataset {cfg.name!r} needs its files: put {src.files_hint} in {raw} or pass --source PATH (licence: {src.licence})")


def _extract_source(archive: Path, raw: Path) -> Path:
    """A ``--source`` archive extracted once into ``raw/from-<name>``; on failure the folders
    this call made are removed again, so a bad archive leaves nothing behind."""
    stem = raw / ("from-" + archive.name.replace(".", "_"))
    marker = stem.with_name(stem.name + ".done")
    if marker.exists() and marker.read_text() == _stamp(archive):
        return stem
    made = [d for d in (raw, *raw.parents) if not d.exists()]  # innermost first
    try:
        safe_extract(archive, stem, fix="pass the dataset's own archive or the folder it extracts to with --source")
        marker.write_text(_stamp(archive))
    except BaseException:
        if made:
            shutil.rmtree(raw, ignore_errors=True)  # made by this call: holds nothing else
        for d in made[1:]:
            _rmdir_if_empty(d)
        raise
    return stem


def _rmdir_if_empty(d: Path) -> None:
    try:
        d.rmdir()
    except OSError:
        pass  # not empty: another dataset's files are there now


def _source_note(cfg: DataConfig) -> Path:
    return Path(cfg.data_dir or default_data_dir()) / "prepared" / f"{cfg.name}.source.json"


def _remember_source(cfg: DataConfig, path: Path) -> None:
    """Record the ``--source`` a named dataset was prepared from, so later commands without
    ``--source`` find it (``data prepare NAME --source X``, then ``train --dataset NAME``)."""
    if cfg.name != "file" and cfg.path and not is_url(cfg.path):  # own data under its own name too
        source = str(Path(cfg.path).expanduser().resolve())
        try:
            before = json.loads(_source_note(cfg).read_text()).get("source")
        except (OSError, ValueError, AttributeError):
            before = None
        if before is not None and before != source:
            log.warning("%s: this name now means %s (it was prepared from %s before); --name NAME keeps the two apart", cfg.name, source, before)
        atomic_write_json(_source_note(cfg), {"source": source, "resolved": str(path.resolve())})


def find_run_source(cfg: DataConfig) -> None:
    """A run's ``data.path`` that is not found from here (relative to the folder it trained in,
    as runs before paths were kept absolute; or a file since moved): the file the dataset was
    last prepared from, remembered under its name, takes its place (logged); without one, own
    data is a one-line error saying how to point the run at the file's new place. Anything
    else is left for the reader's errors."""
    if not cfg.path or is_url(cfg.path):
        return
    p = Path(cfg.path).expanduser()
    if p.exists():
        return
    remembered = _remembered_source(cfg)
    if remembered is not None:
        log.info("%s: the run's source %s is not there; using %s, the file it was last prepared from", cfg.name, p, remembered)
        cfg.path = str(remembered)
    elif is_own_data(cfg.name):
        raise DataError(
            f"the run's data file {p} does not exist; put it back, or prepare it from its new place "
            f"(fuxi-mme data prepare {cfg.name} --source NEW_PATH) and the run finds it by its name"
        )


def _remembered_source(cfg: DataConfig) -> Path | None:
    note = _source_note(cfg)
    try:
        p = Path(json.loads(note.read_text())["resolved"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return p if p.exists() else None


def _stamp(p: Path) -> str:
    st = p.stat()
    return f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"


def _key_parts(cfg: DataConfig, path: Path | None) -> dict:
    parts: dict[str, Any] = {
        "name": cfg.name,
        "ordering": cfg.ordering,
        "min_user_interactions": cfg.min_user_interactions,
        "min_rating": cfg.min_rating,
        "duplicates": cfg.duplicates,
    }
    if cfg.repeats != "keep":  # absent when "keep", so caches prepared before the option stay valid
        parts["repeats"] = cfg.repeats
    if cfg.behavior is not None:  # likewise absent without behaviours
        parts["behavior"] = cfg.behavior
        if cfg.name == "demo":
            parts["demo_behavior_version"] = demo.BEHAVIOR_VERSION
    if cfg.name == "demo":
        parts.update(demo_users=cfg.demo_users, demo_seed=cfg.demo_seed, demo_version=demo.DEMO_VERSION)
    if is_own_data(cfg.name):
        parts.update(columns=[cfg.user_col, cfg.item_col, cfg.time_col, cfg.rating_col], sep=cfg.sep, reader="formats-1")
        if cfg.format != "auto" or cfg.header is not None:
            parts.update(format=cfg.format, header=cfg.header)
    if path is not None:
        parts["source"] = file_fingerprint(path)
    return parts


def handle_duplicates(df: pd.DataFrame, policy: str, source: str) -> tuple[pd.DataFrame, list[str]]:
    """Exact duplicate (user, item, timestamp) rows: refuse, drop or keep them."""
    dup = df.duplicated(["user", "item", "timestamp"], keep="first").to_numpy()
    n = int(dup.sum())
    if n == 0 or policy == "keep":
        return df, ([f"kept {n:,} exact duplicate (user, item, timestamp) rows"] if n else [])
    if policy == "drop":
        return df[~dup].reset_index(drop=True), [f"dropped {n:,} exact duplicate (user, item, timestamp) rows"]
    first = int(np.flatnonzero(dup)[0])
    row = df.iloc[first]
    raise DataError(
        f"{source}: {n:,} row(s) repeat an earlier (user, item, timestamp) exactly, first at data row {first + 1} "
        f"(user {plain(row['user'])}, item {plain(row['item'])}, timestamp {plain(row['timestamp'])}); this usually means a file was "
        "concatenated twice. Fix the file, or pass --set data.duplicates=drop (or keep)"
    )


def check_expected(ds: PreparedDataset) -> list[str]:
    """Compare with the published statistics of a named dataset; return warnings."""
    src = SOURCES.get(ds.name)
    if src is None or not src.expected:
        return []
    got = {k: ds.stats[k] for k in src.expected}
    if got == src.expected:
        return []
    exp = ", ".join(f"{k} {v:,}" for k, v in src.expected.items())
    have = ", ".join(f"{k} {v:,}" for k, v in got.items())
    return [
        f"WARNING: {ds.name} should have {exp} after preprocessing, but has {have}: "
        "the source files or filters differ from the published ones, so numbers are not comparable"
    ]


def load_dataset(cfg: DataConfig, rebuild: bool = False, log_notes: bool = True) -> PreparedDataset:
    """Prepared dataset for ``cfg``, from the cache when its key matches, else built and cached.

    The ``--source`` it came from is remembered only once it prepared (or loaded) without error:
    a file that fails to read leaves nothing in the data folder. Preparing logs its notes (what
    it read the data as, what it dropped) unless ``log_notes`` is False (a caller that prints
    ``ds.stats["notes"]`` itself)."""
    path = resolve_source_path(cfg)
    ds = _load_or_prepare(cfg, path, rebuild, log_notes)
    if path is not None:
        _remember_source(cfg, path)
    return ds


def measured_shape(cfg: DataConfig) -> tuple[str, str]:
    """Prepare (or load) the data of ``cfg`` and pick its shape from what it looks like
    (:func:`fuxi_mme.shapes.choose_shape`): (shape, why)."""
    from ..shapes import choose_shape

    return choose_shape(load_dataset(cfg).stats)


def _load_or_prepare(cfg: DataConfig, path: Path | None, rebuild: bool, log_notes: bool = True) -> PreparedDataset:
    src = get_source(cfg.name)
    columnar = choose_engine(cfg, path)
    parts = {**_key_parts(cfg, path), **({"engine": "columnar"} if columnar else {})}
    key = cache_key(parts)
    folder = Path(cfg.data_dir or default_data_dir()) / "prepared" / f"{cfg.name}-{key}"
    if not rebuild and (folder / "meta.json").exists():
        cached = None
        try:
            cached = load_columnar(folder) if is_columnar(folder) else load_prepared(folder)
        except Exception as exc:  # noqa: BLE001 - any damage to a cache file means: rebuild and replace it
            why = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
            log.warning("cached dataset %s is unreadable (%s); rebuilding it", folder, why)
        if cached is not None:
            return _with_target(cached, cfg)
    if columnar:
        assert path is not None  # choose_engine: a Parquet input
        min_inter = cfg.min_user_interactions if cfg.min_user_interactions is not None else (src.min_user_interactions or 2)
        policy = src.duplicates if cfg.duplicates == "auto" else cfg.duplicates
        log.info("%s: preparing out of core (data.engine=columnar, docs/datasets.md#large-logs)", cfg.name)
        prepare_columnar(path, cfg, cfg.name, folder, {"key": key, "parts": parts}, policy, min_inter, log_notes=log_notes)
        return _with_target(load_columnar(folder), cfg)
    df, titles = src.read(path, cfg)
    has_ts = bool(df.attrs.get("has_timestamps", src.has_timestamps))
    read_notes = list(df.attrs.get("notes", []))
    if has_ts:
        policy = src.duplicates if cfg.duplicates == "auto" else cfg.duplicates
        df, dup_notes = handle_duplicates(df, policy, str(path) if path else cfg.name)
        read_notes += dup_notes
    df = attach_behavior(df, cfg.behavior, str(path) if path else cfg.name)
    df, rep_notes = apply_repeats(df, cfg.repeats, cfg.ordering)
    read_notes += rep_notes
    min_inter = cfg.min_user_interactions if cfg.min_user_interactions is not None else (src.min_user_interactions or 2)
    ds, notes = build_prepared(
        df,
        cfg.name,
        ordering=cfg.ordering,
        min_user_interactions=min_inter,
        min_rating=cfg.min_rating,
        has_timestamps=has_ts,
        item_titles=titles,
        source=str(path) if path else cfg.name,
    )
    notes = read_notes + notes
    for n in notes if log_notes else []:  # what preparation did or read the data as
        log.info("%s: %s", cfg.name, n)
    ds.stats["notes"] = notes
    # a damaged or --rebuild cache is replaced
    save_prepared(ds, folder, {"key": key, "parts": _key_parts(cfg, path)}, replace=folder.exists())
    ds.cache_dir = str(folder)
    return _with_target(ds, cfg)


def _with_target(ds: PreparedDataset, cfg: DataConfig) -> PreparedDataset:
    """``data.target_behavior`` checked against the dataset's behaviours and set on it (the
    splits read it; docs/datasets.md#target-behaviour)."""
    if cfg.target_behavior is not None:
        behavior_code(ds.behavior_names, cfg.target_behavior)
    ds.target_behavior = cfg.target_behavior
    return ds

"""Data pipeline: sources -> canonical table -> prepared sequences -> splits -> batches."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import DataConfig
from . import demo
from .prepared import (
    PreparedDataset,
    build_prepared,
    cache_key,
    default_data_dir,
    file_fingerprint,
    load_prepared,
    save_prepared,
)
from .sources import SOURCES, get_source
from .table import DataError

log = logging.getLogger(__name__)

__all__ = ["DataError", "PreparedDataset", "load_dataset", "resolve_source_path", "SOURCES", "check_expected"]


def resolve_source_path(cfg: DataConfig) -> Path | None:
    src = get_source(cfg.name)
    if not src.needs_files:
        return None
    if cfg.path:
        p = Path(cfg.path).expanduser()
        if not p.exists():
            raise DataError(f"{p} does not exist; pass the {'file' if cfg.name == 'file' else 'dataset folder'} with --data-path")
        return p
    if cfg.name == "file":
        return None  # the reader raises the clear error
    raw = Path(cfg.data_dir or default_data_dir()) / "raw" / cfg.name
    if raw.exists():
        return raw
    raise DataError(
        f"dataset {cfg.name!r} needs its files: put {src.files_hint} in {raw} or pass --data-path FOLDER "
        f"(licence: {src.licence})"
    )


def _key_parts(cfg: DataConfig, path: Path | None) -> dict:
    parts = {
        "name": cfg.name,
        "ordering": cfg.ordering,
        "min_user_interactions": cfg.min_user_interactions,
        "min_rating": cfg.min_rating,
    }
    if cfg.name == "demo":
        parts.update(demo_users=cfg.demo_users, demo_seed=cfg.demo_seed, demo_version=demo.DEMO_VERSION)
    if cfg.name == "file":
        parts.update(columns=[cfg.user_col, cfg.item_col, cfg.time_col, cfg.rating_col], sep=cfg.sep)
    if path is not None:
        parts["source"] = file_fingerprint(path)
    return parts


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
    return [f"WARNING: {ds.name} should have {exp} after preprocessing, but has {have}: "
            "the source files or filters differ from the published ones, so numbers are not comparable"]


def load_dataset(cfg: DataConfig, rebuild: bool = False) -> PreparedDataset:
    """Prepared dataset for ``cfg``, from the cache when its key matches, else built and cached."""
    src = get_source(cfg.name)
    path = resolve_source_path(cfg)
    key = cache_key(_key_parts(cfg, path))
    folder = Path(cfg.data_dir or default_data_dir()) / "prepared" / f"{cfg.name}-{key}"
    if not rebuild and (folder / "meta.json").exists():
        try:
            return load_prepared(folder)
        except (OSError, ValueError, KeyError) as exc:
            log.warning("cached dataset %s is unreadable (%s); rebuilding", folder, exc)
    df, titles = src.read(path, cfg)
    has_ts = src.has_timestamps and (cfg.name != "file" or cfg.time_col is not None)
    ds, notes = build_prepared(
        df,
        cfg.name,
        ordering=cfg.ordering,
        min_user_interactions=cfg.min_user_interactions,
        min_rating=cfg.min_rating,
        has_timestamps=has_ts,
        item_titles=titles,
        source=str(path) if path else cfg.name,
    )
    for n in notes:
        log.warning("%s: %s", cfg.name, n)
    ds.stats["notes"] = notes
    save_prepared(ds, folder, {"key": key, "parts": _key_parts(cfg, path)})
    ds.cache_dir = str(folder)
    return ds

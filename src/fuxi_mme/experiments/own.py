"""A user's own files in experiment suites (``fuxi-mme experiment --source FILE``): each named
and measured as ``train --source`` does it, the shape whose defaults its runs take, the file's
version its runs record, and the command's own data and datasets."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..config import DataConfig, apply_overrides, validate
from ..data.prepared import file_fingerprint, source_changed
from ..presets import build_defaults
from .store import run_file


@dataclass(frozen=True)
class OwnData:
    """A user's own interactions file in a suite (``experiment --source FILE``): the name its
    runs and table rows go by (the one ``train --source`` gives it), its path, and the shape
    measured from it, whose defaults every run takes (docs/datasets.md#defaults-by-shape)."""

    name: str
    path: str
    shape: str
    stamp: dict[str, Any] | None = field(default=None, compare=False)  # its file_fingerprint when measured; None: read back from runs

    def changed_since(self, info: dict[str, Any] | None) -> str | None:
        """Why a finished run's ``run.json`` (its ``source``: the data as it trained on it) is of
        another version of the data, or None (the same, or not recorded)."""
        return f"{self.path} changed since this run (its size or modification time)" if source_changed(info, self.stamp) else None


def own_data(paths: list[str], overrides: list[str] | None = None, names: list[str | None] | None = None) -> dict[str, OwnData]:
    """Each file of ``paths`` named (``names``, else as ``train --source FILE`` names it) and
    measured as ``train --source FILE --set ...`` does it, with the command's ``overrides``
    (column names, filters) applied before measuring; prepared once, into the cache the runs then
    read: name -> :class:`OwnData`."""
    from ..data import measured_shape, own_data_name

    out: dict[str, OwnData] = {}
    for p, given in zip(paths, names or [None] * len(paths)):
        path = Path(p).expanduser()
        if not path.exists():
            raise ValueError(f"--source {p}: no such file or folder")
        name = given or own_data_name(path)
        if name in out and out[name].path != str(path.resolve()):
            raise ValueError(f"--source {p}: another source is already named {name!r} (rename one of the files)")
        cfg = apply_overrides(build_defaults("long", "fuxi-alpha", "base", name), overrides or [])
        cfg.data.name, cfg.data.path = name, str(path.resolve())
        validate(cfg)
        shape, why = measured_shape(cfg.data)
        logging.getLogger("fuxi_mme").info("%s: shape %s: %s", name, shape, why)
        out[name] = OwnData(name, cfg.data.path, shape, file_fingerprint(path))
    return out


def own_from_runs(name: str, run_dirs: list[Path]) -> OwnData | None:
    """Own data a suite ran on, read back from a finished run's ``config.json`` (its path and
    shape), so the tables keep its rows without ``--source``; None when no run says."""
    for d in run_dirs:
        cfg = run_file(d, "config.json") or {}
        path, shape = (cfg.get("data") or {}).get("path"), cfg.get("shape")
        if path and shape:
            return OwnData(name, str(path), str(shape))
    return None


def command_data(
    sources: list[str] | None, datasets: list[str] | None, overrides: list[str], variants: list[str] | None, suites: list
) -> tuple[dict[str, OwnData], list[str] | None]:
    """An experiment command's own files (``--source``, and own data named in ``--datasets``,
    found from the file it was prepared from), named and measured; and the datasets it runs
    (None: each suite's own). A ``--variants`` entry that none of them offers (an extra planned
    for named datasets only) is refused, naming where it runs."""
    from ..data import is_own_data, resolve_source_path
    from ..shapes import DATASETS

    paths: list[str] = list(sources or [])
    names: list[str | None] = [None] * len(paths)
    for d in datasets or []:
        if d not in DATASETS and is_own_data(d):  # own data prepared before under this name: its remembered file
            paths.append(str(resolve_source_path(DataConfig(name=d), progress=False)))
            names.append(d)
    own = own_data(paths, overrides, names) if paths else {}
    chosen = list(dict.fromkeys([*(datasets or []), *own])) if own else datasets
    every = chosen or [d for s in suites for d in s.datasets]
    for v in variants or []:
        if not any(v in s.variants_for(d) for s in suites for d in every):
            where = sorted({d for s in suites for group, more in s.extra if v in more for d in group})
            raise ValueError(f"variant {v!r} runs only on {', '.join(where)}, none of the datasets chosen; add one with --datasets, or drop it")
    return own, chosen

"""Per-epoch logs of a suite's runs, packed into one archive per suite folder.

A finished run keeps ``config.json``, ``run.json`` and ``metrics.json`` as plain files. Its
per-epoch files (``metrics.jsonl``, ``tensorboard/``) and the runner's ``seed<k>.log`` go into
``<root>/<suite>/logs.tar.xz``, under their paths relative to the suite folder. The tables need
one figure from those logs, a run's training seconds: :func:`pack_logs` keeps it in
``<root>/<suite>/train_seconds.json``, so aggregating never opens the archive.
"""

from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile
from pathlib import Path
from typing import Any

from ..utils.runinfo import atomic_write_json

log = logging.getLogger(__name__)

ARCHIVE = "logs.tar.xz"
TRAIN_SECONDS = "train_seconds.json"
RUN_DEPTH = 3  # <suite>/<dataset>/<variant>/seed<k>


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


def sum_train_seconds(records: list[dict[str, Any]]) -> float:
    return float(sum(r.get("epoch_seconds", 0.0) for r in records if r.get("kind") == "train"))


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
    if len(run_dir.parents) < RUN_DEPTH:
        return None
    index = _suite_dir(run_dir) / TRAIN_SECONDS
    if not index.exists():
        return None
    return json.loads(index.read_text()).get(_member(run_dir))


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """A run's per-epoch records: its loose ``metrics.jsonl``, else the copy in the archive of
    the suite folder above it; empty when there is neither."""
    f = run_dir / "metrics.jsonl"
    if f.is_file():
        return parse_records(f.read_text(), str(f))
    if len(run_dir.parents) < RUN_DEPTH or not (_suite_dir(run_dir) / ARCHIVE).is_file():
        return []
    archive, name = _suite_dir(run_dir) / ARCHIVE, f"{_member(run_dir)}/metrics.jsonl"
    with tarfile.open(archive, "r:xz") as tar:
        try:
            data = tar.extractfile(name)
        except KeyError:
            return []
        return parse_records(data.read().decode(), f"{archive}:{name}") if data is not None else []


def loose_logs(suite_dir: Path) -> list[Path]:
    """The per-epoch files under a suite folder: every ``metrics.jsonl``, the files of every
    ``tensorboard/`` folder and the runner's ``seed<k>.log`` files."""
    files = [*suite_dir.glob("*/*/*/metrics.jsonl"), *suite_dir.glob("*/*/*.log"),
             *(p for p in suite_dir.glob("*/*/*/tensorboard/**/*") if p.is_file())]
    return sorted(files)


def _archived(archive: Path) -> dict[str, bytes]:
    if not archive.exists():
        return {}
    with tarfile.open(archive, "r:xz") as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}  # type: ignore[union-attr]  # a file member has data


def _write_archive(archive: Path, members: dict[str, bytes]) -> None:
    """Write ``members`` (sorted, no owners or times: the same logs give the same archive) to a
    temporary file, then move it over ``archive``."""
    tmp = archive.with_name(f".{archive.name}.tmp")
    with tarfile.open(tmp, "w:xz", preset=9) as tar:
        for name in sorted(members):
            info = tarfile.TarInfo(name)
            info.size, info.mode = len(members[name]), 0o644
            tar.addfile(info, io.BytesIO(members[name]))
    tmp.replace(archive)


def pack_logs(suite_dir: Path) -> int:
    """Move a suite folder's loose per-epoch files into its ``logs.tar.xz`` (merged with what it
    holds; a loose file replaces its archived copy) and record each run's training seconds in
    ``train_seconds.json``. The loose files are deleted only after both are written. Returns
    the number of files moved."""
    loose = loose_logs(suite_dir)
    if not loose:
        return 0
    archive = suite_dir / ARCHIVE
    members = _archived(archive)
    members.update({p.relative_to(suite_dir).as_posix(): p.read_bytes() for p in loose})
    seconds = json.loads((suite_dir / TRAIN_SECONDS).read_text()) if (suite_dir / TRAIN_SECONDS).exists() else {}
    for name, data in members.items():
        if name.endswith("/metrics.jsonl"):
            seconds[name[: -len("/metrics.jsonl")]] = sum_train_seconds(parse_records(data.decode(), f"{archive}:{name}"))
    _write_archive(archive, members)
    atomic_write_json(suite_dir / TRAIN_SECONDS, dict(sorted(seconds.items())))
    for p in loose:
        p.unlink()
    for tb in {p for p in suite_dir.glob("*/*/*/tensorboard") if p.is_dir()}:
        shutil.rmtree(tb)
    return len(loose)

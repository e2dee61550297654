"""Checksums of the tensor files in a folder (checkpoints, exports).

A folder's ``checksums.json`` maps file names to their sha256 (and, for files too large to hash
at every read, to their byte size). ``write_manifest`` writes it
(atomically) after the files; ``verify_manifest`` recomputes every listed file and refuses a
mismatch or a missing file with one line naming it. A folder without a manifest (written by
an older version) passes verification unless ``required``.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path

from .runinfo import atomic_write_json

MANIFEST = "checksums.json"


class IntegrityError(ValueError):
    """A file does not match the checksum recorded when it was written."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: str | Path, names: list[str], sized: Sequence[str] = ()) -> dict[str, str]:
    """Record the sha256 of ``folder/name`` for each name, and only the byte size of each of
    ``sized`` (files too large to hash at every read); returns the sha256 mapping."""
    folder = Path(folder)
    sums = {n: sha256_file(folder / n) for n in sorted(names)}
    record: dict = {"sha256": sums}
    if sized:
        record["bytes"] = {n: (folder / n).stat().st_size for n in sorted(sized)}
    atomic_write_json(folder / MANIFEST, record)
    return sums


def verify_manifest(folder: str | Path, required: bool = False) -> None:
    """Raise :class:`IntegrityError` if any file listed in the folder's manifest is missing or
    differs from its recorded sha256."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        if required:
            raise IntegrityError(f"{folder} has no {MANIFEST}; it was not written by this version, re-create it")
        return
    try:
        record = json.loads(path.read_text())
        sums, sizes = record["sha256"], record.get("bytes", {})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise IntegrityError(f"{path} is unreadable ({type(exc).__name__}); the folder is damaged, re-create it") from exc
    for name, want in sizes.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != want:
            raise IntegrityError(f"{f} is missing or not the {want:,} bytes recorded in {MANIFEST}; the folder is damaged, re-create it")
    for name, want in sums.items():
        f = folder / name
        if not f.is_file():
            raise IntegrityError(f"{f} is missing (listed in {MANIFEST}); the folder is incomplete, re-create it")
        if sha256_file(f) != want:
            raise IntegrityError(
                f"{f} does not match its recorded sha256 (damaged or changed since it was written); re-create it or use another copy"
            )

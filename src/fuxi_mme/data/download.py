"""Fetching dataset files: streamed, resumable, checksum-verified downloads and safe extraction.

* :func:`download` streams a URL to ``<dest>.part`` (a progress bar on a terminal, one log line
  otherwise), resumes a partial file with an HTTP ``Range`` request, verifies an MD5 or SHA-256 when one is known, and renames the
  finished file into place (an interrupted download never leaves a file that looks complete).
* :func:`safe_extract` unpacks zip and tar archives into a temporary sibling folder, refusing
  members that would land outside the target (absolute paths, ``..``, links, devices), then
  renames the folder into place.
* :func:`fetch` combines both for a dataset's raw folder.

Set ``FUXI_MME_OFFLINE=1`` to forbid network access (the error then says where to put files).
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import sys
import tarfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

from ..utils.runinfo import temp_dir_beside
from .table import DataError

log = logging.getLogger(__name__)

CHUNK = 1 << 20
USER_AGENT = "fuxi-mme-downloader"


@dataclass(frozen=True)
class Remote:
    """One downloadable file of a named dataset."""

    url: str
    md5: str | None = None
    sha256: str | None = None
    md5_url: str | None = None  # a sidecar "<hex>  <name>" file published next to the archive

    @property
    def filename(self) -> str:
        return Path(urlparse(self.url).path).name or "download"


def is_url(text: str | None) -> bool:
    return bool(text) and urlparse(str(text)).scheme in ("http", "https", "file")


def offline() -> bool:
    return os.environ.get("FUXI_MME_OFFLINE", "").strip() not in ("", "0", "false", "no")


def _hash(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _open(url: str, start: int, timeout: float):
    req = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    if start:
        req.add_header("Range", f"bytes={start}-")
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 - http(s)/file URLs chosen by the user


def fetch_md5_sidecar(url: str, timeout: float = 30.0) -> str | None:
    """The hex digest from a published ``.md5`` file, or None when it can't be read."""
    try:
        with _open(url, 0, timeout) as r:
            text = r.read(4096).decode("ascii", "replace").split()
    except (OSError, urllib.error.URLError, ValueError):
        return None
    for tok in text:
        if len(tok) == 32 and all(c in "0123456789abcdefABCDEF" for c in tok):
            return tok.lower()
    return None


def download(
    url: str,
    dest: Path,
    *,
    md5: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    timeout: float = 60.0,
    where_hint: str = "",
) -> Path:
    """Stream ``url`` to ``dest``; resume ``dest.part`` if present; verify and rename."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    if offline():
        raise DataError(
            f"offline (FUXI_MME_OFFLINE is set), so {url} was not downloaded; download it yourself and put it at "
            f"{dest}{where_hint}, or pass --source PATH"
        )
    part = dest.with_name(dest.name + ".part")
    start = part.stat().st_size if part.exists() else 0
    resp = _connect(url, start, timeout, dest, where_hint)
    if resp is not None:
        with resp:
            _stream(resp, url, part, start, progress)
    _verify(url, part, md5, sha256)
    os.replace(part, dest)
    return dest


def _connect(url: str, start: int, timeout: float, dest: Path, where_hint: str) -> Any:
    """The open response from byte ``start`` on, or None when the part file is already whole."""
    try:
        return _open(url, start, timeout)
    except urllib.error.HTTPError as exc:
        if exc.code == 416 and start:  # the part file is already complete (or bigger than the file)
            return None
        raise DataError(
            f"download of {url} failed: HTTP {exc.code} {exc.reason}; check the URL or fetch the file by hand to {dest}{where_hint}"
        ) from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DataError(
            f"could not download {url} ({reason}); are you offline? Download it yourself and put it at {dest}"
            f"{where_hint}, or pass --source PATH to the file"
        ) from exc


def _stream(resp: Any, url: str, part: Path, start: int, progress: bool) -> None:
    """Append the response to ``part`` (from the start again when the server ignored the Range
    header); an interrupted or short download raises, the part file kept for resuming."""
    status = getattr(resp, "status", 200)
    if start and status != 206:
        start = 0  # the server ignored the Range header: start again
    length = resp.headers.get("Content-Length")
    total = (int(length) + start) if length and length.isdigit() else None
    bar = _bar(total, start, part.name.removesuffix(".part"), progress)
    try:
        with open(part, "ab" if start else "wb") as out:
            while True:
                try:
                    block = resp.read(CHUNK)
                except OSError as exc:
                    raise DataError(
                        f"download of {url} was interrupted ({exc}); run the same command again to resume from {part.stat().st_size:,} bytes"
                    ) from exc
                if not block:
                    break
                out.write(block)
                bar.update(len(block))
    finally:
        bar.close()
    if total is not None and part.stat().st_size < total:
        raise DataError(f"download of {url} stopped at {part.stat().st_size:,} of {total:,} bytes; run the same command again to resume")


def _verify(url: str, part: Path, md5: str | None, sha256: str | None) -> None:
    """Check the downloaded file's digests; on a mismatch delete it and raise."""
    for algo, want in (("md5", md5), ("sha256", sha256)):
        if want:
            got = _hash(part, algo)
            if got != want.lower():
                part.unlink()
                raise DataError(
                    f"{url}: {algo} checksum mismatch (got {got}, expected {want}); the partial file was deleted, "
                    "run the command again (if it keeps failing, the server's file changed: report it)"
                )


class _Quiet:
    """The progress bar when stderr is not a terminal: no redraws into a log file, one line at
    the end (when progress is on)."""

    def __init__(self, name: str, initial: int, enabled: bool):
        self.name, self.done, self.enabled = name, initial, enabled

    def update(self, n: int) -> None:
        self.done += n

    def close(self) -> None:
        if self.enabled:
            log.info("%s: %s bytes downloaded", self.name, f"{self.done:,}")


def _bar(total: int | None, initial: int, name: str, enabled: bool) -> Any:
    stream = sys.stderr
    if not (enabled and stream is not None and stream.isatty()):
        return _Quiet(name, initial, enabled)
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, unit="B", unit_scale=True, unit_divisor=1024, desc=name, file=stream)


def _check_member(name: str, target: Path) -> Path:
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise DataError(f"archive member {name!r} would be written outside {target}; refusing to extract this archive")
    return target.joinpath(*[x for x in p.parts if x not in ("", ".")])


def safe_extract(archive: Path, target: Path, *, fix: str = "delete it and run the command again to download it again") -> Path:
    """Extract a zip / tar(.gz/.bz2/.xz) archive into ``target`` without escaping it.

    ``fix`` ends the one-line error for an unreadable archive: the default suits a file this
    library downloaded; for a file the user gave, the caller says what to pass instead."""
    archive, target = Path(archive), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(target, "extract")
    try:
        kind = "zip" if _looks_zip(archive) else "tar"
        try:
            (_extract_zip if kind == "zip" else _extract_tar)(archive, tmp)
        except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError, zlib_error()) as exc:
            raise _unreadable(archive, kind, exc, fix) from exc
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _looks_zip(archive: Path) -> bool:
    with open(archive, "rb") as f:
        magic = f.read(4)
    return zipfile.is_zipfile(archive) or magic in (b"PK\x03\x04", b"PK\x05\x06") or archive.name.lower().endswith(".zip")


def _unreadable(archive: Path, kind: str, exc: BaseException, fix: str) -> DataError:
    """One line for an archive that cannot be read to its end (tarfile's own message for a file
    that is no tar at all spans several lines, one per compression it tried)."""
    why = str(exc)
    if why.startswith("file could not be opened successfully"):
        why = "not a tar, tar.gz, tar.bz2 or tar.xz file"
    why = " ".join(why.split()) or type(exc).__name__
    return DataError(
        f"{archive} is truncated, corrupt or not a {kind} archive ({why}); expected a zip or tar (.gz, .bz2, .xz) archive "
        f"of the dataset's files: {fix}"
    )


def _extract_zip(archive: Path, tmp: Path) -> None:
    with zipfile.ZipFile(archive) as z:
        for info in z.infolist():
            dest = _check_member(info.filename, tmp)
            mode = (info.external_attr >> 16) & 0o170000
            if mode == 0o120000:
                raise DataError(f"archive member {info.filename!r} is a symbolic link; refusing to extract {archive}")
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with z.open(info) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, CHUNK)


def _extract_tar(archive: Path, tmp: Path) -> None:
    with tarfile.open(archive) as t:
        for m in t:
            dest = _check_member(m.name, tmp)
            if m.issym() or m.islnk() or m.isdev() or m.isfifo():
                raise DataError(f"archive member {m.name!r} is a link or device; refusing to extract {archive}")
            if m.isdir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            if not m.isfile():
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            member = t.extractfile(m)
            assert member is not None
            with member, open(dest, "wb") as out:
                shutil.copyfileobj(member, out, CHUNK)


def zlib_error():
    import zlib

    return zlib.error


def is_archive(path: Path) -> bool:
    name = path.name.lower()
    return name.endswith((".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz"))


def fetch(remotes: list[Remote], raw_dir: Path, *, progress: bool = True, where_hint: str = "") -> Path:
    """Download every remote into ``raw_dir`` (skipping finished ones), extract archives there.

    Returns ``raw_dir``. A marker file records what was fetched; an existing complete folder is
    reused without network access.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    downloads = raw_dir / ".downloads"
    for r in remotes:
        archive = downloads / r.filename
        done = raw_dir / f".{r.filename}.done"
        if done.exists():
            continue
        if not archive.exists():
            md5 = r.md5 or (fetch_md5_sidecar(r.md5_url) if r.md5_url and not offline() else None)
            if r.md5_url and not md5 and not r.sha256:
                log.warning("no checksum could be read from %s; %s is not verified", r.md5_url, r.url)
            download(r.url, archive, md5=md5, sha256=r.sha256, progress=progress, where_hint=where_hint)
        if is_archive(archive):
            stem = archive.name
            for sfx in (".zip", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar"):
                if stem.lower().endswith(sfx):
                    stem = stem[: -len(sfx)]
                    break
            safe_extract(archive, raw_dir / stem)
        else:
            shutil.copyfile(archive, raw_dir / archive.name)
        done.write_text(r.url + "\n")
    return raw_dir

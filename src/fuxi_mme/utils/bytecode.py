"""Python bytecode kept across runs where the install cannot keep it.

Python compiles each module it imports from source unless a ``.pyc`` next to it (in
``__pycache__``) is current, and writes one there if it may. In a read-only environment (a
container image, a shared cluster install) or under ``PYTHONDONTWRITEBYTECODE`` (set by many
Dockerfiles), torch's ~2,300 modules that a training run imports are compiled again by every
command: 6.0 s of a 25.8 s warm ``fuxi-mme train`` on the H100 host
(docs/performance.md#time-to-result). :func:`keep` then points Python's bytecode cache
(``sys.pycache_prefix``, as ``PYTHONPYCACHEPREFIX`` would) at a user folder, so only the first
command pays. The ``fuxi-mme`` program calls it before importing torch; importing the library
does not.

``FUXI_MME_PYCACHE``: ``auto`` (default: only where torch's bytecode is missing and cannot be
written beside it), ``off``, or a folder (always used, written even under
``PYTHONDONTWRITEBYTECODE``). A ``PYTHONPYCACHEPREFIX`` the user set is left alone.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Callable, Mapping, MutableMapping
from pathlib import Path

ENV = "FUXI_MME_PYCACHE"
# modules a training run imports lazily (compilation), deep in torch: if their bytecode is
# there, the install keeps bytecode and nothing needs doing
PROBES = ("_dynamo/utils.py", "_inductor/codecache.py", "fx/experimental/symbolic_shapes.py")


def default_folder(environ: Mapping[str, str] = os.environ) -> Path:
    """``$XDG_CACHE_HOME/fuxi-mme/pycache`` (``~/.cache`` without it)."""
    base = environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fuxi-mme" / "pycache"


def _torch_folder() -> Path | None:
    """torch's package folder, found without importing torch."""
    try:
        spec = importlib.util.find_spec("torch")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _writable(folder: Path) -> bool:
    """Whether a ``__pycache__`` in ``folder`` can take a new file (tried: ``os.access`` says yes to
    root on a read-only mount)."""
    target = folder / "__pycache__"
    try:
        target.mkdir(exist_ok=True)
        probe = target / f".fuxi-mme-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return True
    except OSError:
        return False


def decide(
    setting: str,
    package: Path | None,
    dont_write: bool,
    prefix_set: bool,
    writable: Callable[[Path], bool] = _writable,
    default: Path | None = None,
) -> Path | None:
    """The folder to use as the bytecode cache, or None to leave Python as it is.

    ``setting``: the value of ``FUXI_MME_PYCACHE``; ``package``: torch's folder;
    ``dont_write``: ``sys.dont_write_bytecode``; ``prefix_set``: a prefix is already in use."""
    setting = setting.strip() or "auto"
    if setting == "off" or prefix_set:
        return None
    if setting != "auto":
        return Path(setting).expanduser()
    sources = [package / p for p in PROBES if (package / p).is_file()] if package is not None else []
    if not sources:
        return None  # no torch, or one laid out otherwise: nothing to judge by, Python as it is
    if all(Path(importlib.util.cache_from_source(str(s))).is_file() for s in sources):
        return None  # the install keeps its bytecode
    if not dont_write and all(writable(s.parent) for s in sources):
        return None  # Python writes it beside the sources on the first import
    return default if default is not None else default_folder()


def keep(environ: MutableMapping[str, str] = os.environ) -> Path | None:
    """Apply :func:`decide` to this process (call before torch is imported) and to the processes
    it starts (``PYTHONPYCACHEPREFIX`` in ``environ``: Inductor's compile workers, the runs of
    ``experiment``); returns the folder in use, or None. Never fails: a folder that cannot be
    made leaves Python as it is."""
    prefix_set = sys.pycache_prefix is not None
    folder = decide(environ.get(ENV, "auto"), _torch_folder(), sys.dont_write_bytecode, prefix_set, default=default_folder(environ))
    if folder is None:
        return None
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return None
    sys.pycache_prefix = environ["PYTHONPYCACHEPREFIX"] = str(folder)
    sys.dont_write_bytecode = False
    return folder

"""NVIDIA's Multi-Process Service (MPS) for several runs on one GPU (``experiment --mps``,
``tune --mps``; docs/performance.md#many-runs-per-gpu).

Without MPS the GPU runs one process's kernels at a time and switches between processes by
time slices, so several small runs (a few hundred short kernels a step each) take turns instead
of filling the GPU together. Under MPS their kernels share the GPU at once. :func:`mps_daemon`
starts a control daemon for the command's runs with its own pipe and log folders (so it
neither needs nor touches a system-wide one), points the child processes at it through
``CUDA_MPS_PIPE_DIRECTORY`` / ``CUDA_MPS_LOG_DIRECTORY``, and stops it when the command ends.
A daemon the user already runs (those variables set and its control pipe present) is used as
it is and left running.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from .procs import restored_environ

CONTROL = "nvidia-cuda-mps-control"
ENV = ("CUDA_MPS_PIPE_DIRECTORY", "CUDA_MPS_LOG_DIRECTORY")
QUIT_TIMEOUT_S = 120  # "quit" waits for the daemon's clients (runs still exiting) to end

log = logging.getLogger("fuxi_mme")


class MPSError(RuntimeError):
    """MPS was asked for and cannot be started (one line: what failed and the fix)."""


def _running(pipe_dir: str | None) -> bool:
    return pipe_dir is not None and pipe_dir != "" and (Path(pipe_dir) / "control").exists()


@contextlib.contextmanager
def mps_daemon(enabled: bool = True, workdir: str | os.PathLike[str] | None = None) -> Iterator[str | None]:
    """Run the body with an MPS daemon serving the processes it starts; yields the pipe folder
    (None when ``enabled`` is false). Raises :class:`MPSError` when the control program is
    missing or the daemon does not start."""
    if not enabled:
        yield None
        return
    if _running(os.environ.get(ENV[0])):
        yield os.environ[ENV[0]]
        return
    exe = shutil.which(CONTROL)
    if exe is None:
        raise MPSError(f"--mps: {CONTROL} is not on PATH (it comes with the NVIDIA driver's utilities); install them or leave out --mps")
    base = Path(tempfile.mkdtemp(prefix="fuxi-mme-mps-", dir=workdir))
    dirs = {ENV[0]: str(base / "pipe"), ENV[1]: str(base / "log")}
    for d in dirs.values():
        os.makedirs(d)
    stopped = True  # nothing to stop until the daemon has started
    with restored_environ(*ENV):
        os.environ.update(dirs)
        try:
            try:
                res = subprocess.run([exe, "-d"], capture_output=True, text=True, timeout=60)
            except (OSError, subprocess.SubprocessError) as exc:
                raise MPSError(f"--mps: {CONTROL} -d could not be run ({type(exc).__name__}: {exc}); run without --mps") from exc
            if res.returncode != 0:
                msg = (res.stderr or res.stdout).strip().splitlines()
                raise MPSError(f"--mps: {CONTROL} -d failed ({msg[-1] if msg else f'exit {res.returncode}'}); run without --mps")
            stopped = False
            try:
                yield dirs[ENV[0]]
            finally:
                stopped = _quit(exe, dirs[ENV[0]])
        finally:
            if stopped:  # a daemon that did not stop keeps its pipe folder: the only way to reach it
                shutil.rmtree(base, ignore_errors=True)


def _quit(exe: str, pipe_dir: str) -> bool:
    """Ask the daemon to stop; False (with a warning naming the command that stops it) when it
    does not answer in time or fails. Never raises, so the body's own error is the one shown."""
    try:
        res = subprocess.run([exe], input="quit\n", capture_output=True, text=True, timeout=QUIT_TIMEOUT_S)
        if res.returncode == 0:
            return True
        why = f"exit {res.returncode}"
    except (OSError, subprocess.SubprocessError) as exc:
        why = type(exc).__name__
    log.warning("--mps: the MPS daemon did not stop (%s); stop it with: echo quit | CUDA_MPS_PIPE_DIRECTORY=%s %s", why, pipe_dir, CONTROL)
    return False

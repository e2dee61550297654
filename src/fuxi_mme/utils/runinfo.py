"""Run metadata (git commit, versions, device) and small file helpers."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from .procs import stat_fields


def _read_git_head(start: Path) -> str | None:
    """The commit of HEAD read from the .git folder itself, for machines without a usable git."""
    for d in [start, *start.parents]:
        git = d / ".git"
        if not git.is_dir():
            continue
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref: "):
            return head
        ref = head[5:]
        if (git / ref).is_file():
            return (git / ref).read_text().strip()
        packed = git / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
        return None
    return None


def git_commit(path: str | Path | None = None) -> str | None:
    """The commit of the code, ``-dirty`` when it has local changes.

    ``FUXI_MME_COMMIT`` overrides it, for copies of a working tree whose ``.git`` is absent
    or stale (remote GPU machines).
    """
    if os.environ.get("FUXI_MME_COMMIT"):
        return os.environ["FUXI_MME_COMMIT"]
    here = Path(path or Path(__file__).resolve().parent)
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        if out.returncode != 0:
            return _read_git_head(here)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return _read_git_head(here)


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {"python": platform.python_version()}
    for pkg in ("fuxi-mme", "torch", "numpy", "pandas", "pyarrow", "safetensors", "triton"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    out["cuda"] = torch.version.cuda
    return out


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "device": str(device),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        info.update(
            gpu=p.name,
            gpu_memory_gb=round(p.total_memory / 2**30, 1),
            capability=f"{p.major}.{p.minor}",
            gpu_count=torch.cuda.device_count(),
            tf32=torch.backends.cuda.matmul.allow_tf32,  # fp32 matmuls (and the fused ranking) on tensor cores, or strict fp32
        )
    return info


def process_cpu_seconds() -> float | None:
    """CPU seconds (user + system) this process and its children have used so far: finished
    children from ``getrusage``, live ones (Inductor's compile-worker pool, which is shut down
    only at exit) from ``/proc``; None where the platform has no ``resource`` module. A run
    records it in ``run.json`` (``host_cpu_seconds``), so a packed suite knows how many host
    cores a run of its kind keeps busy (experiments/packing.py)."""
    try:
        import resource
    except ImportError:  # Windows
        return None
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return round(own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime + live_descendants_cpu_seconds(), 3)


def live_descendants_cpu_seconds(pid: int | None = None, proc: Path = Path("/proc")) -> float:
    """CPU seconds of the live descendants of ``pid`` (default this process), each with its own
    finished children, read from ``/proc/<pid>/stat``; 0 where there is no ``/proc``."""
    root = os.getpid() if pid is None else pid
    children: dict[int, list[int]] = {}
    ticks: dict[int, int] = {}
    try:
        entries = [d for d in proc.iterdir() if d.name.isdigit()]
    except OSError:
        return 0.0
    for d in entries:
        try:
            text = (d / "stat").read_text()
        except OSError:  # ended since the listing
            continue
        f = stat_fields(text)  # state ppid ... utime stime cutime cstime
        children.setdefault(int(f[1]), []).append(int(d.name))
        ticks[int(d.name)] = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    total, stack = 0, list(children.get(root, []))
    while stack:
        p = stack.pop()
        total += ticks.get(p, 0)
        stack.extend(children.get(p, []))
    return total / os.sysconf("SC_CLK_TCK")


def run_info(device: torch.device) -> dict[str, Any]:
    return {"commit": git_commit(), "versions": versions(), "device": device_info(device)}


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _read_umask()  # read once, at import (os.umask can only be read by setting it)


def as_created(path: str | Path, folder: bool = False) -> None:
    """Give a temporary file or folder (``tempfile`` makes them owner-only) the permissions a
    plainly created one gets under the user's umask, before it is renamed into place, so
    reports, results and exports can be read by whoever could read the folder they are in."""
    os.chmod(path, (0o777 if folder else 0o666) & ~UMASK)


def temp_dir_beside(target: str | Path, tag: str = "tmp") -> Path:
    """A new temporary folder next to ``target`` (``.<name>.<tag>-XXXX``, on the same file system,
    so it can be renamed into place), with the permissions a plainly made folder gets."""
    t = Path(target)
    t.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{t.name}.{tag}-", dir=t.parent))
    as_created(tmp, folder=True)  # mkdtemp makes it owner-only
    return tmp


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write to a temporary file in the same folder, then rename over the target."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", dir=p.parent)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        as_created(tmp)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, default=str) + "\n")

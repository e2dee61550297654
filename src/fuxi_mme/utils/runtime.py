"""Where and how a run computes: device, seeds, precision. Training, evaluation, serving and
the benchmarks all take these from here, so a run's numbers reproduce everywhere."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def resolve_device(name: str) -> torch.device:
    """``train.device`` ("auto", "cpu", "cuda", "cuda:1", ...) as a device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"train.device={name!r} but no CUDA GPU is visible; use --set train.device=cpu")
    return dev


def setup_device(device: str, local_rank: int | None = None, num_threads: int | None = None, tf32: bool = True) -> torch.device:
    """Resolve the device (one GPU per torchrun process) and apply the thread and TF32 settings."""
    dev = resolve_device(device)
    if local_rank is not None and dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", local_rank)
    if num_threads:
        torch.set_num_threads(num_threads)
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.backends.cudnn.allow_tf32 = tf32
        if dev.index is not None:
            torch.cuda.set_device(dev)
    return dev


def seed_everything(seed: int, deterministic: bool = False) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False


def autocast_dtype(amp: str) -> torch.dtype | None:
    """The autocast dtype for ``train.amp`` ("none" or "bf16"), on every device."""
    return torch.bfloat16 if amp == "bf16" else None


def persistent_compile_cache(data_dir: str | os.PathLike[str]) -> str:
    """Keep Inductor's and Triton's compiled artefacts in ``<data_dir>/compile-cache`` (unless
    TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR are set), so they live as long as the prepared
    data and a second run of the same shapes skips most compilation (docs/performance.md#time-to-result).
    Must run before the first compilation; returns the folder."""
    folder = os.path.join(os.fspath(data_dir), "compile-cache")
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(folder, "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(folder, "triton"))
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


def seconds_since_process_start() -> float | None:
    """Wall seconds since this process started (Linux /proc), or None elsewhere: the start-up
    a run pays before ``train`` (interpreter, imports) in its phase breakdown."""
    try:
        with open("/proc/self/stat") as f:
            start_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime"))
        import time

        return time.time() - (boot + start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return None

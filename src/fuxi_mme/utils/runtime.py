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

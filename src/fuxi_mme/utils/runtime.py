"""Where and how a run computes: device, seeds, precision. Training, evaluation, serving and
the benchmarks all take these from here, so a run's numbers reproduce everywhere."""

from __future__ import annotations

import contextlib
import os
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch

from .procs import restored_environ

if TYPE_CHECKING:
    from ..config import TrainConfig


def resolve_device(name: str) -> torch.device:
    """``train.device`` ("auto", "cpu", "cuda", "cuda:1", ...) as a device that exists here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} asked for but no CUDA GPU is visible; use --device cpu (or --set train.device=cpu)")
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


def train_device(t: TrainConfig, local_rank: int | None = None) -> torch.device:
    """The device of a run's ``train`` settings, set up as every run sets it up: threads
    (``train.num_threads``) and TF32 (``train.tf32``, on by default). Training, loading a run, and
    the benchmarks that build a trainer themselves all go through here."""
    return setup_device(t.device, local_rank, t.num_threads, t.tf32)


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


JOB_ID_PREFIX = "fuxi-mme-"


def interpreting() -> bool:
    """Triton's CPU interpreter is on (``TRITON_INTERPRET=1``: how the tests run the kernels
    without a GPU). Here, not in ``triton_support``, so it is known without importing triton."""
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _torch_default_cache_dir() -> str | None:
    """Inductor's default cache folder (absolute), or None where this torch does not say."""
    try:
        from torch._inductor.runtime.runtime_utils import default_cache_dir

        return os.path.abspath(default_cache_dir())
    except (ImportError, AttributeError):
        return None


def persistent_compile_cache(data_dir: str | os.PathLike[str]) -> str:
    """Keep Inductor's and Triton's compiled kernels in ``<data_dir>/compile-cache`` (unless
    TORCHINDUCTOR_CACHE_DIR / TRITON_CACHE_DIR are set), so they live as long as the prepared
    data and a second run of the same shapes skips most compilation (docs/performance.md#time-to-result);
    AOTAutograd's graphs and Dynamo's automatic-dynamic profile go there too (their use is
    switched on by :func:`compile_settings`). Must run before the first compilation; returns
    the Inductor cache folder."""
    folder = os.path.join(os.fspath(data_dir), "compile-cache")
    default = _torch_default_cache_dir()  # first: importing Inductor's runtime may itself set the variable
    if default is not None and os.environ.get("TORCHINDUCTOR_CACHE_DIR") == default:
        # torch writes its default into the environment the first time it asks (importing
        # torch._dynamo can do that): not the user's choice, so ours replaces it
        del os.environ["TORCHINDUCTOR_CACHE_DIR"]
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(folder, "inductor"))
    os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(folder, "triton"))
    return os.environ["TORCHINDUCTOR_CACHE_DIR"]


CACHE_ENV = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")


@contextlib.contextmanager
def compile_settings(shape_key: str | None = None, cache_dir: str | os.PathLike[str] | None = None) -> Iterator[None]:
    """torch.compile settings for the body (a run's training), restored after it:

    * with ``cache_dir``, compiled kernels and graphs kept under ``<cache_dir>/compile-cache``
      (:func:`persistent_compile_cache`), the two folder variables put back afterwards, so a
      later run in the same process with another data folder caches in its own (Inductor's
      compile workers, started once per process, keep the folder of the run that started them);
    * AOTAutograd's cache also takes graphs that hold our custom autograd Functions (the
      small-table lookup of the attention biases, the MoE row dispatch, the chunked scan).
      PyTorch leaves such graphs out by default because an arbitrary Function may have side
      effects; ours are pure tensor functions whose forward and backward Dynamo traces into the
      graph, so the cache key covers their code. Without this a warm run traces forward and
      backward again;
    * Dynamo's record of which dimensions varied (its automatic-dynamic profile) is kept under
      a job id per ``shape_key`` (the run's model and data shapes), so a warm run compiles the
      dynamic graph at once instead of a static one first and a dynamic one at the first change
      of shape. A job id the user set (TORCH_COMPILE_JOB_ID) stands.

    Settings a torch version lacks are left alone."""
    with contextlib.ExitStack() as stack:
        if cache_dir is not None:
            stack.enter_context(restored_environ(*CACHE_ENV))
            persistent_compile_cache(cache_dir)
        try:  # private configuration: absent or renamed in some torch versions
            import torch._functorch.config as functorch_config

            if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):
                stack.enter_context(functorch_config.patch(autograd_cache_allow_custom_autograd_functions=True))
        except ImportError:
            pass
        compiler_config = getattr(torch.compiler, "config", None)
        if shape_key and compiler_config is not None and getattr(compiler_config, "job_id", "") is None:
            stack.enter_context(compiler_config.patch(job_id=JOB_ID_PREFIX + shape_key))
            _reset_shape_profile()  # loaded once per process: an earlier run's would stand in for this one's
        yield


def _reset_shape_profile() -> None:
    """Forget the automatic-dynamic profile Dynamo loaded in this process, so the next
    compilation loads the one of the current job id."""
    try:
        from torch._dynamo import pgo

        pgo.reset_code_state()
    except (ImportError, AttributeError):
        pass

"""Checkpoints without pickles: tensors in safetensors files, everything else in JSON.

Layout of ``<run_dir>/checkpoints/<tag>/``: ``model.safetensors``, and for resumable tags
``optim.safetensors`` (optimizer tensors and RNG states) and ``state.json`` (epoch, step,
selection state, scheduler, optimizer hyperparameters, config fingerprint), then
``checksums.json`` (the sha256 of each of those, checked on every load).

Crash safety (docs/training.md#crash-safety): a checkpoint is written into a temporary folder
``.<tag>.tmp-*`` and swapped in with two renames, ``<tag>`` -> ``<tag>.old`` and the temporary
folder -> ``<tag>``. A kill at any instant leaves a complete ``<tag>`` or a complete
``<tag>.old``; loading falls back to ``<tag>.old`` when ``<tag>`` is missing. Temporary folders
a kill left behind are removed by the next save of that tag and by a resume.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..utils.integrity import MANIFEST, IntegrityError, verify_manifest, write_manifest
from ..utils.runinfo import atomic_write_text, temp_dir_beside

log = logging.getLogger(__name__)
FORMAT = 2  # state.json "format": 2 and later always have a checksums.json

# The steps of a save, in order, at which tests inject a kill (tests/test_faults.py). The
# three swap steps happen only when the tag already exists.
FAULT_STEPS = (
    "begin",
    "after-model",
    "after-optim",
    "after-state",
    "after-manifest",
    "after-remove-old",
    "after-rename-old",
    "after-rename-new",
    "after-cleanup",
)
_fault_hook: Callable[[str, Path], None] | None = None  # tests only: called as (step, target folder)


def _fault(step: str, target: Path) -> None:
    if _fault_hook is not None:
        _fault_hook(step, target)


class CheckpointError(RuntimeError):
    pass


def config_fingerprint(cfg_dict: dict[str, Any]) -> str:
    """Hash of what fixes the parameter shapes and the data: a resume must match it."""
    keep = {"model": cfg_dict["model"], "data": {k: cfg_dict["data"][k] for k in ("name", "protocol", "max_len")}}
    return hashlib.sha256(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:16]


def _flatten_optim(sd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors, meta = {}, {"param_groups": sd["param_groups"], "state": {}}
    for pid, st in sd["state"].items():
        meta["state"][str(pid)] = {}
        for k, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().cpu()
                meta["state"][str(pid)][k] = "tensor"
            else:
                meta["state"][str(pid)][k] = v
    return tensors, meta


def _unflatten_optim(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state = {}
    for pid, st in meta["state"].items():
        state[int(pid)] = {k: (tensors[f"optim.{pid}.{k}"] if v == "tensor" else v) for k, v in st.items()}
    return {"state": state, "param_groups": meta["param_groups"]}


def _fsync(path: Path) -> None:
    """Flush a file or folder to disk, so a power loss cannot reorder the renames before it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # folders cannot be opened on some systems; the renames stay atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _old(target: Path) -> Path:
    return target.with_name(target.name + ".old")


def _swap_in(tmp: Path, target: Path) -> None:
    """Rename the complete folder ``tmp`` to ``target``; at every instant ``target`` or
    ``target.old`` is a complete checkpoint."""
    old = _old(target)
    if target.exists():
        if old.exists():  # left by an earlier kill; target is complete, so old is not needed
            shutil.rmtree(old)
        _fault("after-remove-old", target)
        os.rename(target, old)
        _fault("after-rename-old", target)
    os.rename(tmp, target)  # with no target (a kill after the rename above), old stays until here
    _fsync(target.parent)
    _fault("after-rename-new", target)
    shutil.rmtree(old, ignore_errors=True)
    _fault("after-cleanup", target)


def remove_leftovers(folder: Path, tag: str = "*") -> list[Path]:
    """Remove what killed saves left in ``folder`` (a run's ``checkpoints/``): the temporary
    ``.<tag>.tmp-*`` folders, and ``<tag>.old`` where ``<tag>`` is complete."""
    if not folder.is_dir():
        return []
    stale = sorted(folder.glob(f".{tag}.tmp-*"))
    stale += [p for p in sorted(folder.glob(f"{tag}.old")) if _complete(p.with_name(p.name[: -len(".old")]))]
    for p in stale:
        log.info("removing %s (left by an interrupted checkpoint save)", p)
        shutil.rmtree(p, ignore_errors=True)
    return stale


Model = torch.nn.Module | dict[str, torch.Tensor]  # a module, or its state dict (a sharded run gathers it)
Optim = torch.optim.Optimizer | dict[str, Any] | None


def _state_dicts(model: Model, optimizer: Optim) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None]:
    """The model's and the optimizer's state dicts, each given as such or as its owner."""
    weights = model.state_dict() if isinstance(model, torch.nn.Module) else model
    return weights, optimizer.state_dict() if isinstance(optimizer, torch.optim.Optimizer) else optimizer


def save_checkpoint(folder: Path, model: Model, state: dict[str, Any], optimizer: Optim = None, rng: dict[str, torch.Tensor] | None = None) -> None:
    """Write ``folder`` crash-safely (see the module docstring). ``model`` and ``optimizer``
    may be given as their state dicts (a sharded run gathers them first: train/sharding.py)."""
    _fault("begin", folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder.parent, folder.name)
    tmp = temp_dir_beside(folder)
    try:
        model_sd, optim_sd = _state_dicts(model, optimizer)
        weights = {k: v.detach().contiguous().cpu() for k, v in model_sd.items()}
        save_file(weights, str(tmp / "model.safetensors"))
        names = ["model.safetensors", "state.json"]
        _fault("after-model", folder)
        extra: dict[str, torch.Tensor] = {}
        meta = {**state, "format": FORMAT}
        if optim_sd is not None:
            t, m = _flatten_optim(optim_sd)
            extra.update(t)
            meta["optimizer"] = m
        for k, v in (rng or {}).items():
            extra[f"rng.{k}"] = v.contiguous().cpu()
        if extra:
            save_file(extra, str(tmp / "optim.safetensors"))
            names.append("optim.safetensors")
        _fault("after-optim", folder)
        (tmp / "state.json").write_text(json.dumps(meta, indent=2, default=str))
        _fault("after-state", folder)
        write_manifest(tmp, names)
        for n in [*names, MANIFEST]:
            _fsync(tmp / n)
        _fsync(tmp)
        _fault("after-manifest", folder)
        _swap_in(tmp, folder)
    except Exception:  # a kill (or KeyboardInterrupt) leaves tmp to the next save's clean-up
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _host_copy(obj: Any) -> Any:
    """``obj`` with every tensor copied to host memory (a new tensor even on the CPU: training
    goes on changing the originals in place while the copy is written)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return {k: _host_copy(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_host_copy(v) for v in obj)
    return obj


class CheckpointWriter:
    """Writes a run's checkpoints in one background thread while training goes on: the
    tensors are copied to host memory at once (:meth:`submit`), and :func:`save_checkpoint`
    writes them (its fsyncs and renames were about 12 ms of every epoch, 1.2 s of a 101-epoch
    ML-1M run). One write at a time, in the order submitted; a new submit, :meth:`wait` and
    :meth:`close` wait for the one in flight and raise its error, if any. A kill during a write
    leaves what a kill during a synchronous save leaves (the module docstring); an exception in
    the training thread still lets the write in flight finish (Python joins the thread at exit)."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None

    def submit(self, folder: Path, model: Model, state: dict[str, Any], optimizer: Optim = None, rng: dict[str, torch.Tensor] | None = None) -> None:
        """Queue a :func:`save_checkpoint` of these arguments, copied now."""
        weights, optim = _state_dicts(model, optimizer)
        snapshot = (folder, _host_copy(weights), json.loads(json.dumps(state, default=str)), _host_copy(optim), _host_copy(rng))
        self.wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="fuxi-mme-checkpoint")
        self._pending = self._pool.submit(save_checkpoint, *snapshot)

    def wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            if self._pool is not None:
                self._pool.shutdown()
                self._pool = None


def _complete(folder: Path) -> bool:
    return (folder / "model.safetensors").is_file() and (folder / "state.json").is_file()


def resolve_checkpoint(folder: Path) -> Path:
    """``folder``, or ``folder.old`` when a save was killed between its two renames (or
    ``folder`` lost a file) and ``folder.old`` is complete."""
    folder = Path(folder)
    if _complete(folder) or not _complete(_old(folder)):
        return folder
    log.warning("checkpoint %s is missing or incomplete (a save was interrupted); using %s", folder, _old(folder))
    return _old(folder)


def verify_checkpoint(folder: Path) -> None:
    """Check every file against ``checksums.json``; :class:`CheckpointError` (one line naming
    the file) on a mismatch, a missing file, or a manifest that a format-2 checkpoint lost."""
    try:
        if not (folder / MANIFEST).is_file():
            fmt = json.loads((folder / "state.json").read_text()).get("format", 1) if (folder / "state.json").is_file() else 1
            if fmt >= FORMAT:
                raise IntegrityError(f"{folder / MANIFEST} is missing (this checkpoint was written with one); the folder is damaged")
        verify_manifest(folder)
    except (IntegrityError, OSError, ValueError, AttributeError, TypeError) as exc:
        what = str(exc).split("; ")[0]  # the problem; the advice below fits a checkpoint
        raise CheckpointError(f"corrupt checkpoint: {what}; use the run's other checkpoint (--checkpoint best or last) or train again") from exc


def load_weights(folder: Path, model: torch.nn.Module, map_location: str | torch.device = "cpu") -> None:
    model.load_state_dict(read_weights(folder, model, map_location))


def read_weights(folder: Path, model: torch.nn.Module, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's weights, checked (checksums, keys and shapes) against ``model``."""
    folder = resolve_checkpoint(folder)
    path = folder / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass a run directory that finished at least one epoch")
    verify_checkpoint(folder)
    try:
        weights = load_file(str(path), device=str(map_location))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupt or not a safetensors file ({exc}); use another run or checkpoint") from exc
    missing, unexpected = set(model.state_dict()) - set(weights), set(weights) - set(model.state_dict())
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}); "
            "it was written by a different model config"
        )
    shapes = [k for k, v in model.state_dict().items() if v.shape != weights[k].shape]
    if shapes:
        raise CheckpointError(f"checkpoint {path}: shape mismatch for {shapes[:5]}; it was written by a different model config")
    return weights


def load_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """state.json and the optimizer/RNG tensors of a resumable checkpoint (``folder.old``
    when a save was killed between its renames)."""
    folder = resolve_checkpoint(folder)
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"no resumable checkpoint at {folder}; the run did not finish an epoch, start it again without --resume")
    verify_checkpoint(folder)
    try:
        state = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "optim.safetensors")) if (folder / "optim.safetensors").exists() else {}
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt ({exc}); cannot resume from it") from exc
    return state, tensors


def optimizer_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return _unflatten_optim(tensors, state["optimizer"])


def truncate_metrics_log(path: Path, epoch: int) -> int:
    """Rewrite ``metrics.jsonl`` (atomically) without the records a resume from a checkpoint
    of ``epoch`` writes again: those of later epochs, the final ``test`` record (written after
    the last checkpoint) and a line torn by a kill. Returns the number of lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if not isinstance(rec, dict) or rec.get("kind") == "test":
            continue
        if isinstance(rec.get("epoch"), (int, float)) and rec["epoch"] > epoch:
            continue
        keep.append(line)
    dropped = len(lines) - len(keep)
    if dropped:
        log.info("%s: dropped %d record(s) after epoch %d (written again by this resume)", path, dropped, epoch)
        atomic_write_text(path, "".join(x + "\n" for x in keep))
    return dropped

"""Checkpoints without pickles: tensors in safetensors files, everything else in JSON.

Layout of ``<run_dir>/checkpoints/<tag>/``: ``model.safetensors``, and for resumable tags
``optim.safetensors`` (optimizer tensors and RNG states) and ``state.json`` (epoch, step,
selection state, scheduler, optimizer hyperparameters, config fingerprint). Each checkpoint
is written into a temporary folder and swapped in with renames, so a crash leaves either the
old or the new checkpoint, never a torn one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file


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


def _swap_in(tmp: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
    os.rename(tmp, target)
    if old.exists():
        shutil.rmtree(old)


def save_checkpoint(
    folder: Path,
    model: torch.nn.Module,
    state: dict[str, Any],
    optimizer: torch.optim.Optimizer | None = None,
    rng: dict[str, torch.Tensor] | None = None,
) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        weights = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        extra: dict[str, torch.Tensor] = {}
        meta = dict(state)
        if optimizer is not None:
            t, m = _flatten_optim(optimizer.state_dict())
            extra.update(t)
            meta["optimizer"] = m
        for k, v in (rng or {}).items():
            extra[f"rng.{k}"] = v.contiguous().cpu()
        if extra:
            save_file(extra, str(tmp / "optim.safetensors"))
        (tmp / "state.json").write_text(json.dumps(meta, indent=2, default=str))
        _swap_in(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_weights(folder: Path, model: torch.nn.Module, map_location: str | torch.device = "cpu") -> None:
    path = folder / "model.safetensors"
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}; pass a run directory that finished at least one epoch")
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
    model.load_state_dict(weights)


def load_state(folder: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """state.json and the optimizer/RNG tensors of a resumable checkpoint."""
    try:
        state = json.loads((folder / "state.json").read_text())
        tensors = load_file(str(folder / "optim.safetensors")) if (folder / "optim.safetensors").exists() else {}
    except (OSError, ValueError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {folder} is incomplete or corrupt ({exc}); cannot resume from it") from exc
    return state, tensors


def optimizer_state(state: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    return _unflatten_optim(tensors, state["optimizer"])

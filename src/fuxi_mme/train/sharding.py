"""Item tables sharded across ranks with FSDP2 (``train.shard_items``; docs/training.md#sharded-item-tables).

Under ``torchrun`` with ``train.shard_items=true`` the trainer's step module (the model plus
its item vectors) becomes one FSDP2 unit (``torch.distributed.fsdp.fully_shard``): every
parameter, the item tables included, is a DTensor sharded row-wise (dim 0) over the ranks, and
the optimizer, built on those parameters afterwards, keeps its Adam moments as shards too. So
the persistent state of the table (weights, gradient, two moments: 16 B per parameter) is
divided by the number of ranks. The forward all-gathers the whole table once (the unit is not
resharded after the forward, so the backward needs no second gather), and the backward
reduce-scatters the gradient: the same volume as DDP's all-reduce. A step still holds the whole
table (gathered, normalised, and its gradient), so what sharding gains is bounded: the memory
arithmetic is in docs/training.md#sharded-item-tables.

The rest of the trainer is unchanged: the same per-rank rows and negatives, the same loss
normaliser, so N sharded processes follow the single-process trajectory like DDP does
(tests/test_sharding.py). Around it:

* evaluation gathers the table once (:func:`gathered`) and scores exactly as one process;
  full-ranking needs every item's vector, and the gathered table costs what a training step
  holds anyway;
* checkpoints hold full, unsharded tensors with the keys and optimizer layout of an unsharded
  run (:func:`full_model_state`, :func:`full_optimizer_state`), so they load in one process and
  resume sharded or not;
* buffers (the MoE aux-free bias) follow rank 0 before every step, as DDP broadcasts them;
* gradient clipping needs nothing: ``clip_grad_norm_`` reduces the norms of DTensor gradients
  over the ranks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
from torch import nn

from ..config import Config, ConfigError
from ..models.common import SequenceModel
from . import distributed as D

log = logging.getLogger(__name__)


def wanted(cfg: Config, model: SequenceModel, info: D.DistInfo) -> bool:
    """``train.shard_items`` resolved: True under torchrun; in one process a logged no-op.
    :class:`ConfigError` for a model FSDP2 cannot shard correctly."""
    if not cfg.train.shard_items:
        return False
    if not info.enabled:
        log.info("train.shard_items: no effect in one process (it shards across torchrun ranks); training as usual")
        return False
    if model.has_unused_parameters():
        # FSDP2 reduce-scatters the gradients that exist: a parameter without one on some rank
        # (an expert that got no tokens) would make the ranks' collectives disagree
        raise ConfigError(
            "train.shard_items=true: this model can leave a parameter without a gradient (model.moe.backend=loop); "
            "use model.moe.backend=auto or batched, or train.shard_items=false"
        )
    if cfg.train.compile is True and info.main:
        log.warning("train.compile=true: not compiling under train.shard_items (FSDP2 and torch.compile are not combined here); training eagerly")
    return True


def shard(module: nn.Module, info: D.DistInfo, device: torch.device) -> nn.Module:
    """``module`` (the trainer's step module) as one FSDP2 unit over all ranks, rank 0's
    weights on every rank; returns the same object, now an ``FSDPModule``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    D.broadcast_module(module, info)  # identical start even if seeds were not
    # kept gathered from the forward to the end of the backward: one all-gather a step, not two
    fully_shard(module, mesh=init_device_mesh(device.type, (info.world,)), reshard_after_forward=False)
    module.register_forward_pre_hook(lambda m, args: _sync_buffers(m))
    if info.main:
        log.info("train.shard_items: FSDP2 over %d ranks; %s", info.world, _shard_summary(module))
    return module


def _sync_buffers(module: nn.Module) -> None:
    """Rank 0's buffers on every rank (DDP does this before every forward)."""
    for b in module.buffers():
        dist.broadcast(b, src=0)


def _local(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def _shard_summary(module: nn.Module) -> str:
    """What rank 0 holds: its rows of each item table and its share of all parameters."""
    held = sum(_local(p).numel() for p in module.parameters())
    total = sum(p.numel() for p in module.parameters())
    tables = [f"{n} {_local(p).shape[0]:,} of {p.shape[0]:,} rows" for n, p in module.named_parameters() if "item_emb" in n]
    return f"rank 0 holds {held:,} of {total:,} parameters and their optimizer state ({'; '.join(tables)})"


@contextlib.contextmanager
def gathered(module: nn.Module) -> Iterator[None]:
    """The whole model on every rank inside the block (one all-gather), sharded again after.

    Evaluation runs the plain model inside it: each rank scores its own evaluation batches
    with the full item table, with no collective per batch (ranks may get different numbers)."""
    from torch.distributed.fsdp import FSDPModule

    fsdp = cast(FSDPModule, module)
    fsdp.unshard()
    try:
        yield
    finally:
        fsdp.reshard()


# ---------------------------------------------------------------------- checkpoints
def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The unsharded state dict of ``model`` on rank 0 (CPU tensors, the keys of an unsharded
    model), empty on the other ranks. Every rank must call it."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}  # all of them: a model's state holds tensors


def full_optimizer_state(opt: torch.optim.Optimizer, main: bool) -> dict[str, Any] | None:
    """``opt.state_dict()`` with every sharded tensor gathered: the layout an unsharded run
    writes (state by parameter index), on rank 0; None on the others. Every rank must call it
    (one all-gather per tensor, in the same order everywhere)."""
    from torch.distributed.tensor import DTensor

    sd = opt.state_dict()
    state = {}
    for pid, st in sd["state"].items():
        full = {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in st.items()}
        state[pid] = {k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in full.items()} if main else {}
    return {"state": state, "param_groups": sd["param_groups"]} if main else None


def load_model_state(model: nn.Module, weights: dict[str, torch.Tensor] | None, from_rank0: bool = False) -> None:
    """Load a full (unsharded) state dict into the sharded ``model``: every rank passes its own
    copy, or (``from_rank0``) rank 0 passes it and the others None, so they need no shared file
    system. Keys and shapes are checked by the caller (``checkpoint.read_weights``)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=from_rank0)
    set_model_state_dict(model, dict(weights or {}), options=options)


def load_optimizer_state(opt: torch.optim.Optimizer, sd: dict[str, Any]) -> None:
    """Load a full optimizer state dict (an unsharded run's layout, present on every rank)
    into the optimizer of sharded parameters: each tensor shaped like its parameter becomes
    this rank's shard of it (no communication)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = [p for g in opt.param_groups for p in g["params"]]
    state = {}
    for pid, st in sd["state"].items():
        p = params[int(pid)]
        state[pid] = {
            k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and v.shape == p.shape
            else v
            for k, v in st.items()
        }
    opt.load_state_dict({"state": state, "param_groups": sd["param_groups"]})

"""Multi-process training under ``torchrun`` (DistributedDataParallel).

The same ``fuxi-mme train`` entry point runs in one process or under
``torchrun --nproc_per_node=N``: torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` and
:func:`init` joins the process group (NCCL on GPU, gloo on CPU) with a timeout, so a rank that
dies makes the others fail with a message instead of hanging.

How work is split, so that N processes follow the same trajectory as one process with the
same global batch (``train.batch_size`` is always the *global* batch):

* every rank draws the same per-epoch permutation (seeded by seed and epoch) and the same
  negatives for the whole global batch, then keeps rows ``rank::world``;
* the loss is normalised by the global number of target positions, known on every rank from
  the shared arrays without communication; DDP averages gradients over ranks, so the update
  equals the single-process one up to floating-point summation order;
* full-ranking evaluation gives each rank whole evaluation batches (batch ``b`` goes to rank
  ``b % world``), so every user's scores are computed exactly as in one process, and the ranks
  are gathered everywhere: metrics are identical, and every rank takes the same early-stopping
  decision;
* only rank 0 writes logs and checkpoints.

With ``train.shard_items`` the parameters are sharded with FSDP2 instead of replicated by DDP
(``sharding.py``); everything above stays as it is.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


SINGLE = DistInfo()


def from_env() -> DistInfo:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    return DistInfo(int(os.environ.get("RANK", "0")), world, int(os.environ.get("LOCAL_RANK", "0")))


def init(info: DistInfo, device: torch.device, timeout_s: float) -> None:
    """Join the process group (idempotent)."""
    if not info.enabled or dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    log.info("rank %d/%d joined (%s, timeout %.0f s)", info.rank, info.world, backend, timeout_s)


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, info: DistInfo):
    if not info.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_objects(obj, info: DistInfo) -> list:
    if not info.enabled:
        return [obj]
    out = [None] * info.world
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(t: torch.Tensor, info: DistInfo) -> torch.Tensor:
    if info.enabled:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast_module(module: torch.nn.Module, info: DistInfo) -> None:
    """Copy rank 0's parameters and buffers to every rank."""
    if not info.enabled:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def barrier(info: DistInfo) -> None:
    if info.enabled:
        dist.barrier()


class CollectiveTimeout(RuntimeError):
    pass


def explain(exc: BaseException, info: DistInfo, timeout_s: float) -> BaseException:
    """A clearer error for the usual multi-process failure: another rank died or hung."""
    text = str(exc)
    if info.enabled and any(k in text.lower() for k in ("timeout", "timed out", "connection reset", "connection closed", "broken pipe", "nccl")):
        return CollectiveTimeout(
            f"rank {info.rank}/{info.world}: a collective operation failed ({text.splitlines()[0][:200]}). "
            f"Another rank most likely crashed or hung (timeout {timeout_s:.0f} s, train.dist_timeout); "
            "look at the first error in the other ranks' output"
        )
    return exc

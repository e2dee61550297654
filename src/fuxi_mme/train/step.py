"""One training step: forward, loss and backward of batches, used by every execution path.

The eager step runs one :class:`~fuxi_mme.data.batches.Batch`; the length-chunked step runs the
chunks of one batch as a list (their forwards count as one batch for the model, e.g. for an
MoE balance loss, and one backward pass follows); the CUDA-graph step records this same
function on static batches (``graphs.py``). Legend: B rows, N width, P target positions, D width.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..data.batches import Batch
from ..models.common import SequenceModel
from .loss import position_softmax_loss

# (ids, ts, query_ts, behaviors or None) -> (user vectors (B, N, D), item vectors (I+1, D)): the
# model's forward, plain, compiled or wrapped in DistributedDataParallel
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class StepSettings:
    temperature: float
    full: bool  # softmax over the whole catalogue (train.loss=full)
    amp: torch.dtype | None  # autocast dtype, None for fp32
    scale: float = 1.0  # 1 / train.grad_accum: gradients accumulate over that many batches
    autocast_cache: bool = True  # off inside CUDA graphs (cached casts would be captured)
    padded_positions: bool = False  # the positions are padded to a bucket (target 0): the CUDA-graph step


def batch_loss(forward: Forward, batch: Batch, normalizer: float | torch.Tensor, st: StepSettings) -> torch.Tensor:
    """The loss of one batch at its target positions, divided by ``normalizer`` (the number of
    targets of the whole global batch, so chunks and ranks add up to the batch's mean)."""
    assert batch.positions is not None and batch.pos_targets is not None, "a training batch (make_batch of TrainArrays)"
    dev = batch.ids.device
    with torch.autocast(dev.type, dtype=st.amp, enabled=st.amp is not None, cache_enabled=st.autocast_cache):
        user_BND, items_ID = forward(batch.ids, batch.ts, batch.query_ts, batch.behaviors)
        user_PD = user_BND.reshape(-1, user_BND.shape[-1]).index_select(0, batch.positions)
        negatives = batch.negatives if batch.negatives is not None else batch.pos_targets.new_zeros(len(batch.pos_targets), 0)
        return position_softmax_loss(
            user_PD, batch.pos_targets, items_ID, negatives, st.temperature, normalizer, full=st.full, padded=st.padded_positions
        )


def loss_and_backward(
    forward: Forward, model: SequenceModel, batches: list[Batch], normalizer: float | torch.Tensor, st: StepSettings
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Loss and aux loss of ``batches`` (one batch, or the chunks of one), gradients (scaled
    by ``st.scale``) accumulated into ``.grad``; returns both detached."""
    together = model.one_batch_of_routing() if len(batches) > 1 else contextlib.nullcontext()
    share = getattr(forward, "sharing_items", None)  # chunks: the item table once (train/loop.py)
    with together, share() if share is not None and len(batches) > 1 else contextlib.nullcontext():
        losses = [batch_loss(forward, b, normalizer, st) for b in batches]
    loss = losses[0] if len(losses) == 1 else torch.stack(losses).sum()
    aux = model.aux_loss()  # of the whole batch's routing, set when the block ended
    ((loss + aux if aux is not None else loss) * st.scale).backward()
    model.release_aux_graphs()  # nothing of this step's autograd graph outlives it
    return loss.detach(), (aux.detach() if aux is not None else None)

"""Shared building blocks and the interface every sequential model implements.

Legend: B batch, N positions, D width, H heads, I items (+1 padding row), T tokens (B*N).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm without a learnable weight (RMSN in docs/models.md#notation)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def bucket_bounds(divisor: float, max_bucket: int) -> torch.Tensor:
    """Integer thresholds T_b = ceil(exp(divisor * b)), b = 1..max_bucket: for an integer
    x >= 1, floor(ln(x) / divisor) >= b exactly when x >= T_b."""
    return torch.tensor([math.ceil(math.exp(divisor * b)) for b in range(1, max_bucket + 1)], dtype=torch.long)


def time_bucket(dt: torch.Tensor, divisor: float = 0.301, max_bucket: int = 128, bounds: torch.Tensor | None = None) -> torch.Tensor:
    """bucket(x) = floor(ln(max(|x|, 1)) / divisor) clipped to [0, max_bucket]; ``dt`` integer seconds.

    Integer gaps are bucketed by counting the integer thresholds they reach (one ``bucketize``
    pass, exact and identical on every device, no float64 logarithm over the B*N*N gaps: that
    took ~15% of a CPU step); floating gaps use the formula in float64. ``bounds``: the
    thresholds of :func:`bucket_bounds` already on ``dt``'s device (the models keep them as a
    buffer: built lazily inside a step they would be a host copy, and under ``torch.compile``
    a cache filled on the first call changes what the compiled code guards on, so the second
    call recompiles).
    """
    if dt.is_floating_point():
        x = dt.abs().clamp(min=1).to(torch.float64)
        return torch.floor(torch.log(x) / divisor).clamp(0, max_bucket).long()
    if bounds is None:
        bounds = bucket_bounds(divisor, max_bucket).to(dt.device)
    return torch.bucketize(dt.abs(), bounds, right=True)


def sequence_lengths(ids: torch.Tensor) -> torch.Tensor:
    """(B,) real positions of each row of ``ids`` (B, N): every batch here holds a sequence's
    items first and padding (id 0) after them."""
    return (ids != 0).sum(1)


def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    """(N, N) bool, True where key j <= query i (the diagonal included)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


class Dropout(nn.Dropout):
    """``nn.Dropout`` with a faster CPU path: the mask comes from one ``rand_like`` compared in
    place (36 ms against 64 ms for a (128, 200, 150) activation on 2 cores; CPU Bernoulli
    sampling was ~8% of a CPU training step). Same distribution and scaling; other devices, and
    evaluation, use ``nn.Dropout`` unchanged."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or x.device.type != "cpu" or not 0.0 < self.p < 1.0 or self.inplace:
            return super().forward(x)
        keep = torch.rand_like(x)
        keep.ge_(self.p).mul_(1.0 / (1.0 - self.p))
        return x * keep


class SwiGLU(nn.Module):
    """SwiGLU(z) = W2(phi(W1 z) * W3 z), bias-free."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim or dim, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(z)) * self.w3(z))


BEHAVIOR_ROWS = 16  # behaviour table rows: 0 = none/padding, then up to 15 behaviours of a dataset


def behavior_table(use: bool, dim: int) -> nn.Embedding | None:
    """The learned behaviour embedding (docs/models.md#behaviour-input), or None when off (then
    a model has exactly the parameters it had before behaviours existed)."""
    if not use:
        return None
    emb = nn.Embedding(BEHAVIOR_ROWS, dim, padding_idx=0)
    nn.init.trunc_normal_(emb.weight, std=0.02)
    with torch.no_grad():
        emb.weight[0].zero_()
    return emb


class ItemInput(nn.Module):
    """x0 = E[item] * sqrt(d) [+ B[behaviour] * sqrt(d)] + P[position]; dropout; padded positions zeroed."""

    def __init__(self, num_items: int, dim: int, max_len: int, dropout: float, positions: bool = True, behaviors: bool = False):
        super().__init__()
        self.dim = dim
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim) if positions else None
        self.dropout = Dropout(dropout)
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        if self.pos_emb is not None:
            nn.init.trunc_normal_(self.pos_emb.weight, std=0.02)
        self.behavior_emb = behavior_table(behaviors, dim)  # created last: the other tables' init is unchanged

    def forward(self, ids_BN: torch.Tensor, behaviors_BN: torch.Tensor | None = None) -> torch.Tensor:
        x = self.item_emb(ids_BN) * math.sqrt(self.dim)
        if self.behavior_emb is not None and behaviors_BN is not None:
            x = x + self.behavior_emb(behaviors_BN) * math.sqrt(self.dim)
        if self.pos_emb is not None:
            x = x + self.pos_emb.weight[: ids_BN.shape[1]]
        x = self.dropout(x)
        return x * (ids_BN != 0).unsqueeze(-1).to(x.dtype)


class TemporalBuckets(nn.Module):
    """The models' temporal bucket ids, once per forward: (B, N, N), or None when the config
    (or a dataset without timestamps) turns the temporal channel off."""

    def __init__(self, cfg) -> None:
        super().__init__()
        self.enabled, self.divisor, self.max_bucket = cfg.use_temporal, cfg.time_bucket_divisor, cfg.num_time_buckets
        # built here, moved with the model, not saved in checkpoints (derived from the config)
        self.bounds: torch.Tensor
        self.register_buffer("bounds", bucket_bounds(self.divisor, self.max_bucket), persistent=False)

    def forward(self, ts_BN: torch.Tensor, query_ts_BN: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled:
            return None
        return time_bucket(query_ts_BN[:, :, None] - ts_BN[:, None, :], self.divisor, self.max_bucket, bounds=self.bounds)


class SequenceModel(nn.Module):
    """Interface: ``forward`` gives one scoring vector per position, ``item_vectors`` gives the
    scoring vectors of all items; the score of an item is their dot product (for cosine models
    both are unit vectors). ``aux_loss`` is added to the training loss (MoE balancing).

    A model's special training needs are answered here, so the trainer, exporter and server
    never test for a model class: what to release after a backward pass, how forwards of one
    batch run in chunks count as one batch, compiler options, whether DDP must look for unused
    parameters, and whether the CUDA-graph step may run length chunks with their own backward
    or compile the model. The defaults fit a model with no such needs."""

    max_len: int

    def forward(self, ids: torch.Tensor, ts: torch.Tensor, query_ts: torch.Tensor, behaviors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) scoring vectors; ``behaviors`` (B, N) codes are read only by a model built
        with ``model.use_behavior``."""
        raise NotImplementedError

    def item_vectors(self) -> torch.Tensor:  # (I+1, D)
        raise NotImplementedError

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def router_stats(self) -> dict[str, torch.Tensor]:
        return {}

    def release_aux_graphs(self) -> None:
        """Called after each backward pass: drop references that would keep its graph alive."""

    def one_batch_of_routing(self) -> contextlib.AbstractContextManager:
        """Forwards inside the block count as one batch (e.g. for a balance loss)."""
        return contextlib.nullcontext()

    def compile_options(self) -> dict[str, Any] | None:
        """``torch.compile`` options this model needs (None: Inductor's defaults)."""
        return None

    def has_unused_parameters(self) -> bool:
        """Whether a training step can leave parameters without a gradient (DDP must look)."""
        return False

    def independent_length_chunks(self) -> bool:
        """Whether each length chunk of a batch may run its own backward pass (nothing couples
        the rows of a batch, such as a balance loss over all of its routing)."""
        return True

    def graph_compile_problem(self) -> str | None:
        """Why this model must not be compiled inside CUDA graphs (None: it may)."""
        return None

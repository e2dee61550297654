"""Shared building blocks and the interface every sequential model implements.

Legend: B batch, N positions, D width, H heads, I items (+1 padding row), T tokens (B*N).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def rms_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """RMSNorm without a learnable weight (SPEC: RMSN)."""
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def l2_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def time_bucket(dt: torch.Tensor, divisor: float = 0.301, max_bucket: int = 128) -> torch.Tensor:
    """bucket(x) = floor(ln(max(|x|, 1)) / divisor) clipped to [0, max_bucket]; ``dt`` integer seconds."""
    # float64 on every device, so CPU and GPU agree on bucket boundaries (computed once a forward).
    x = dt.abs().clamp(min=1).to(torch.float64)
    return torch.floor(torch.log(x) / divisor).clamp(0, max_bucket).long()


def causal_mask(n: int, device: torch.device) -> torch.Tensor:
    """(N, N) bool, True where key j <= query i (the diagonal included)."""
    return torch.ones(n, n, dtype=torch.bool, device=device).tril()


class SwiGLU(nn.Module):
    """SwiGLU(z) = W2(phi(W1 z) * W3 z), bias-free."""

    def __init__(self, dim: int, hidden: int, out_dim: int | None = None):
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, out_dim or dim, bias=False)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(z)) * self.w3(z))


class ItemInput(nn.Module):
    """x0 = E[item] * sqrt(d) + P[position]; dropout; padded positions zeroed."""

    def __init__(self, num_items: int, dim: int, max_len: int, dropout: float, positions: bool = True):
        super().__init__()
        self.dim = dim
        self.item_emb = nn.Embedding(num_items + 1, dim, padding_idx=0)
        self.pos_emb = nn.Embedding(max_len, dim) if positions else None
        self.dropout = nn.Dropout(dropout)
        nn.init.trunc_normal_(self.item_emb.weight, std=0.02)
        with torch.no_grad():
            self.item_emb.weight[0].zero_()
        if self.pos_emb is not None:
            nn.init.trunc_normal_(self.pos_emb.weight, std=0.02)

    def forward(self, ids_BN: torch.Tensor) -> torch.Tensor:
        x = self.item_emb(ids_BN) * math.sqrt(self.dim)
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

    def forward(self, ts_BN: torch.Tensor, query_ts_BN: torch.Tensor) -> torch.Tensor | None:
        if not self.enabled:
            return None
        return time_bucket(query_ts_BN[:, :, None] - ts_BN[:, None, :], self.divisor, self.max_bucket)


class SequenceModel(nn.Module):
    """Interface: ``forward`` gives one scoring vector per position, ``item_vectors`` gives the
    scoring vectors of all items; the score of an item is their dot product (for cosine models
    both are unit vectors). ``aux_loss`` is added to the training loss (MoE balancing)."""

    max_len: int

    def forward(self, ids: torch.Tensor, ts: torch.Tensor, query_ts: torch.Tensor) -> torch.Tensor:  # (B, N, D)
        raise NotImplementedError

    def item_vectors(self) -> torch.Tensor:  # (I+1, D)
        raise NotImplementedError

    def aux_loss(self) -> torch.Tensor | None:
        return None

    def router_stats(self) -> dict[str, torch.Tensor]:
        return {}

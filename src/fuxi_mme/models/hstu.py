"""HSTU (arXiv 2402.17152) as docs/models.md#hstu: pointwise attention with relative position and
time biases inside the SiLU, no FFN.

Legend: B batch, N positions, D width, H heads, Dq / Dv per-head widths.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .attention import select_attention, semantic_norm
from .common import Dropout, ItemInput, SequenceModel, TemporalBuckets, l2_normalize, sequence_lengths


def _ln(x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], eps=1e-6)


class HSTUBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, max_len: int):
        super().__init__()
        H, Dq, Dv = cfg.num_heads, cfg.qk_dim, cfg.v_dim
        self.H, self.Dq, self.Dv, self.max_len = H, Dq, Dv, max_len
        self.norm = semantic_norm(cfg.attention_norm, max_len)
        self.uvqk = nn.Linear(cfg.dim, 2 * H * Dv + 2 * H * Dq, bias=False)
        self.pos_w = nn.Parameter(torch.empty(max_len).normal_(std=0.02))
        self.time_w = nn.Parameter(torch.empty(cfg.num_time_buckets + 1).normal_(std=0.02))
        self.out = nn.Linear(H * Dv, cfg.dim, bias=True)
        self.drop = Dropout(cfg.dropout)
        self.attend = select_attention(cfg.attention, "hstu")

    def forward(self, x, buckets, lengths=None):
        B, N, _ = x.shape
        H, Dq, Dv = self.H, self.Dq, self.Dv
        u, v, q, k = F.silu(self.uvqk(_ln(x))).split([H * Dv, H * Dv, H * Dq, H * Dq], dim=-1)
        q = q.view(B, N, H, Dq).transpose(1, 2)
        k = k.view(B, N, H, Dq).transpose(1, 2)
        v = v.view(B, N, H, Dv).transpose(1, 2)
        a = self.attend(q, k, v, self.pos_w, self.time_w, buckets, self.norm, lengths)
        return x + self.out(self.drop(u * _ln(a)))


class HSTU(SequenceModel):
    def __init__(self, cfg: ModelConfig, num_items: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.temporal = TemporalBuckets(cfg)
        self.input = ItemInput(num_items, cfg.dim, max_len, cfg.dropout, behaviors=cfg.use_behavior)
        self.blocks = nn.ModuleList(HSTUBlock(cfg, max_len) for _ in range(cfg.num_layers))

    def forward(self, ids, ts, query_ts, behaviors=None):
        x = self.input(ids, behaviors)
        buckets = self.temporal(ts, query_ts)
        lengths = sequence_lengths(ids)
        for blk in self.blocks:
            x = blk(x, buckets, lengths)
        return l2_normalize(x)

    def item_vectors(self):
        return l2_normalize(self.input.item_emb.weight)

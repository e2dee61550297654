"""Softmax-attention baselines: SASRec (arXiv 1808.09781) and a LLaMA-style decoder.

Legend: B batch, N positions, D width, H heads.

Both score by cosine like the FuXi models, so the loss and evaluation are the same harness.
Sequences are left-aligned, so causal masking alone keeps padding (which comes after the real
items) out of every real position.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .common import Dropout, ItemInput, SequenceModel, SwiGLU, l2_normalize


def _attention(x: torch.Tensor, qkv: nn.Linear, out: nn.Linear, H: int, dropout: float, rope=None) -> torch.Tensor:
    B, N, D = x.shape
    q, k, v = qkv(x).view(B, N, 3, H, D // H).permute(2, 0, 3, 1, 4)
    if rope is not None:
        q, k = rope(q), rope(k)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
    return out(y.transpose(1, 2).reshape(B, N, D))


class SASRecBlock(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"sasrec: model.dim={cfg.dim} must be divisible by model.num_heads={cfg.num_heads}")
        self.H, self.p = cfg.num_heads, cfg.dropout
        self.ln1, self.ln2 = nn.LayerNorm(cfg.dim, eps=1e-8), nn.LayerNorm(cfg.dim, eps=1e-8)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim)
        self.out = nn.Linear(cfg.dim, cfg.dim)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, cfg.ffn_dim), nn.ReLU(), Dropout(cfg.dropout), nn.Linear(cfg.ffn_dim, cfg.dim))
        self.drop = Dropout(cfg.dropout)

    def forward(self, x):
        x = x + self.drop(_attention(self.ln1(x), self.qkv, self.out, self.H, self.p if self.training else 0.0))
        return x + self.drop(self.ffn(self.ln2(x)))


class SASRec(SequenceModel):
    def __init__(self, cfg: ModelConfig, num_items: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.input = ItemInput(num_items, cfg.dim, max_len, cfg.dropout, behaviors=cfg.use_behavior)
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.num_layers))
        self.final = nn.LayerNorm(cfg.dim, eps=1e-8)

    def forward(self, ids, ts, query_ts, behaviors=None):
        x = self.input(ids, behaviors)
        for blk in self.blocks:
            x = blk(x)
        return l2_normalize(self.final(x))

    def item_vectors(self):
        return l2_normalize(self.input.item_emb.weight)


class RoPE(nn.Module):
    """Rotary position embedding on (B, H, N, Dh), rotating pairs (i, i + Dh/2)."""

    def __init__(self, head_dim: int, max_len: int, base: float = 10000.0):
        super().__init__()
        if head_dim % 2:
            raise ValueError(f"llama: per-head width {head_dim} must be even for RoPE")
        inv = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
        ang = torch.outer(torch.arange(max_len, dtype=torch.float32), inv)
        self.cos: torch.Tensor
        self.sin: torch.Tensor
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)

    def forward(self, x):
        N = x.shape[-2]
        c, s = self.cos[:N].to(x.dtype), self.sin[:N].to(x.dtype)
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], dim=-1)


class LlamaBlock(nn.Module):
    def __init__(self, cfg: ModelConfig, rope: RoPE):
        super().__init__()
        self.H, self.p, self.rope = cfg.num_heads, cfg.dropout, rope
        self.n1, self.n2 = nn.RMSNorm(cfg.dim, eps=1e-6), nn.RMSNorm(cfg.dim, eps=1e-6)
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=False)
        self.out = nn.Linear(cfg.dim, cfg.dim, bias=False)
        self.ffn = SwiGLU(cfg.dim, int(round(cfg.ffn_multiply * cfg.dim)))
        self.drop = Dropout(cfg.dropout)

    def forward(self, x):
        x = x + self.drop(_attention(self.n1(x), self.qkv, self.out, self.H, self.p if self.training else 0.0, self.rope))
        return x + self.drop(self.ffn(self.n2(x)))


class Llama(SequenceModel):
    def __init__(self, cfg: ModelConfig, num_items: int, max_len: int):
        super().__init__()
        if cfg.dim % cfg.num_heads:
            raise ValueError(f"llama: model.dim={cfg.dim} must be divisible by model.num_heads={cfg.num_heads}")
        self.max_len = max_len
        self.input = ItemInput(num_items, cfg.dim, max_len, cfg.dropout, positions=False, behaviors=cfg.use_behavior)
        rope = RoPE(cfg.dim // cfg.num_heads, max_len)
        self.blocks = nn.ModuleList(LlamaBlock(cfg, rope) for _ in range(cfg.num_layers))
        self.final = nn.RMSNorm(cfg.dim, eps=1e-6)

    def forward(self, ids, ts, query_ts, behaviors=None):
        x = self.input(ids, behaviors)
        for blk in self.blocks:
            x = blk(x)
        return l2_normalize(self.final(x))

    def item_vectors(self):
        return l2_normalize(self.input.item_emb.weight)

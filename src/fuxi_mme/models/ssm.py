"""State-space encoder (docs/models.md#state-space-encoder): a Mamba-style selective SSM mixer,
its residual block, and the ``ssm`` sequential recommender built from them (after Mamba4Rec,
arXiv 2403.03900). The same blocks replace or join the FuXi blocks under ``model.mixer``.

Legend: B batch, N positions, D width, Di inner width (expand * D), S state size, R step rank.

Sequences are left-aligned (padding after the real items), and every operation here is causal,
so padding never reaches a real position. The mixer also zeroes padded inputs and step sizes,
so a left-padded sequence gives its real positions the same outputs too (tested): a zero step
keeps the state unchanged (decay exp(0) = 1, no input) and leading padding leaves it at zero.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig
from .common import Dropout, ItemInput, SequenceModel, SwiGLU, l2_normalize
from .moe import MoE
from .ssm_scan import SCANS, selective_scan

MIXERS = ("attention", "ssm", "hybrid")


def check_ssm_config(cfg: ModelConfig) -> None:
    """Raise a one-line ConfigError naming the field for a bad state-space setting."""
    if cfg.mixer not in MIXERS:
        raise ConfigError(f"model.mixer={cfg.mixer!r} is not one of {', '.join(MIXERS)}")
    if cfg.ssm_scan not in SCANS:
        raise ConfigError(f"model.ssm_scan={cfg.ssm_scan!r} is not one of {', '.join(SCANS)}")
    for key in ("ssm_state", "ssm_conv", "ssm_expand", "ssm_chunk"):
        if getattr(cfg, key) < 1:
            raise ConfigError(f"model.{key}={getattr(cfg, key)} must be at least 1")
    if cfg.ssm_chunk & (cfg.ssm_chunk - 1):
        raise ConfigError(f"model.ssm_chunk={cfg.ssm_chunk} must be a power of two (16, 32, 64, ...)")
    if cfg.ssm_dt_rank < 0:
        raise ConfigError(f"model.ssm_dt_rank={cfg.ssm_dt_rank} must be 0 (ceil(dim / 16)) or positive")


class SelectiveSSM(nn.Module):
    """Mamba-1 mixer, (B, N, D) -> (B, N, D):

    x, z = in_proj(x); x = phi(causal depthwise conv(x)); dt = softplus(W_dt(W_r x) + b);
    B, C = W_B x, W_C x; y = scan(x, dt, A = -exp(A_log), B, C, D); out_proj(y * phi(z)).
    """

    def __init__(
        self,
        dim: int,
        state: int = 16,
        conv: int = 4,
        expand: int = 2,
        dt_rank: int = 0,
        scan: str = "auto",
        chunk: int = 64,
        max_len: int | None = None,
    ):
        super().__init__()
        Di = expand * dim
        R = dt_rank or math.ceil(dim / 16)
        self.Di, self.S, self.R, self.scan, self.chunk, self.max_len = Di, state, R, scan, chunk, max_len
        self.in_proj = nn.Linear(dim, 2 * Di, bias=False)
        self.conv = nn.Conv1d(Di, Di, conv, groups=Di, padding=conv - 1, bias=True)
        self.x_proj = nn.Linear(Di, R + 2 * state, bias=False)
        self.dt_proj = nn.Linear(R, Di, bias=True)
        # Mamba's initialisation: steps log-uniform in [1e-3, 0.1] through the softplus bias,
        # A = -(1..S) per channel, D = 1
        nn.init.uniform_(self.dt_proj.weight, -(R**-0.5), R**-0.5)
        dt = torch.exp(torch.rand(Di) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3)).clamp(min=1e-4)
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus^-1(dt)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, state + 1, dtype=torch.float32)).repeat(Di, 1))
        self.D = nn.Parameter(torch.ones(Di))
        self.out_proj = nn.Linear(Di, dim, bias=False)

    def forward(self, x_BND: torch.Tensor, valid_BN: torch.Tensor) -> torch.Tensor:
        N = x_BND.shape[1]
        keep = valid_BN.unsqueeze(-1).to(x_BND.dtype)
        x, z = self.in_proj(x_BND).chunk(2, dim=-1)
        x = x * keep  # padded inputs never enter the convolution window of a real position
        x = F.silu(self.conv(x.transpose(1, 2))[..., :N].transpose(1, 2)) * keep  # causal; the bias stays out of padding
        dt_r, B_BNS, C_BNS = self.x_proj(x).split([self.R, self.S, self.S], dim=-1)
        dt = F.softplus(self.dt_proj(dt_r).float()) * keep  # zero step: the state passes padding unchanged
        A = -torch.exp(self.A_log.float())
        y = selective_scan(x, dt, A, B_BNS, C_BNS, self.D, self.scan, self.chunk, self.max_len)
        return self.out_proj(y.to(z.dtype) * F.silu(z))


class SSMBlock(nn.Module):
    """Pre-norm residual block: o = x + dropout(SSM(RMSN(x))); x_next = o + FFN(dropout(RMSN(o))),
    the FFN a bias-free SwiGLU of width ``ffn_multiply * dim`` (as FuXi's stage 2) or the MoE
    layer handed in (Fuxi-MME with ``model.mixer=ssm``); ``ffn_multiply = 0`` drops the FFN."""

    def __init__(self, cfg: ModelConfig, dim: int, max_len: int, moe: MoE | None = None):
        super().__init__()
        self.norm1 = nn.RMSNorm(dim, eps=1e-6)
        self.mixer = SelectiveSSM(dim, cfg.ssm_state, cfg.ssm_conv, cfg.ssm_expand, cfg.ssm_dt_rank, cfg.ssm_scan, cfg.ssm_chunk, max_len)
        self.drop = Dropout(cfg.dropout)
        hidden = int(round(cfg.ffn_multiply * dim))
        self.norm2 = nn.RMSNorm(dim, eps=1e-6) if moe is not None or hidden > 0 else None
        self.ffn_moe = moe
        self.ffn = SwiGLU(dim, hidden) if moe is None and hidden > 0 else None

    def moe_layers(self) -> list[MoE]:
        return [self.ffn_moe] if self.ffn_moe is not None else []

    def forward(self, x: torch.Tensor, valid: torch.Tensor, stream: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, N, D), valid (B, N) bool, stream (B, N) stream index (the MoE router's)."""
        o = x + self.drop(self.mixer(self.norm1(x), valid))
        if self.norm2 is None:
            return o
        z = self.drop(self.norm2(o))
        return o + (self.ffn_moe(z, valid, stream) if self.ffn_moe is not None else self.ffn(z))  # type: ignore[misc]


class SSMRec(SequenceModel):
    """Item input (no positional table: the recurrence orders positions) -> L SSM blocks ->
    RMSNorm -> L2-normalised user vectors, scored against the item table by cosine."""

    def __init__(self, cfg: ModelConfig, num_items: int, max_len: int):
        super().__init__()
        check_ssm_config(cfg)
        self.max_len = max_len
        self.input = ItemInput(num_items, cfg.dim, max_len, cfg.dropout, positions=False)
        self.blocks = nn.ModuleList(SSMBlock(cfg, cfg.dim, max_len) for _ in range(cfg.num_layers))
        self.final = nn.RMSNorm(cfg.dim, eps=1e-6)

    def forward(self, ids: torch.Tensor, ts: torch.Tensor, query_ts: torch.Tensor, behaviors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, N, D) user vectors; ``behaviors`` is unused (the ssm model refuses model.use_behavior)."""
        valid = ids != 0
        x = self.input(ids)
        for blk in self.blocks:
            x = blk(x, valid)
        return l2_normalize(self.final(x))

    def item_vectors(self) -> torch.Tensor:
        return l2_normalize(self.input.item_emb.weight)

"""FuXi-alpha (arXiv 2502.03036), exactly as docs/models.md#fuxi-alpha, and its block.

Legend: B batch, N positions, D width, H heads, Dq / Dv per-head widths.

The block optionally swaps one of its projections for a Mixture-of-Experts layer, which is how
Fuxi-MME reuses it (:mod:`fuxi_mme.models.fuxi_mme`); with ``moe=None`` it is plain FuXi-alpha.
``model.mixer`` replaces the FuXi blocks by state-space blocks (``ssm``) or puts one after each
(``hybrid``; docs/models.md#state-space-encoder); ``attention`` builds exactly the published model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigError, ModelConfig, MoEConfig
from .attention import select_attention, semantic_norm
from .common import Dropout, ItemInput, SequenceModel, SwiGLU, TemporalBuckets, l2_normalize, rms_norm, sequence_lengths
from .denoise import TokenGate, denoise_penalty, make_denoise, release_denoise
from .moe import MoE
from .ssm import SSMBlock, check_ssm_config


def _make_moe(moe: MoEConfig | None, dim: int, out_dim: int, kind: str, hidden: int | None, bias: bool, num_streams: int) -> MoE:
    assert moe is not None, "an MoE placement is set only with model.moe"
    return MoE(
        dim,
        out_dim,
        moe.num_experts,
        moe.top_k,
        kind=kind,
        hidden=hidden,
        bias=bias,
        shared_expert=moe.shared_expert,
        router_noise=moe.router_noise,
        balance=moe.balance,
        aux_loss_weight=moe.aux_loss_weight,
        bias_update_rate=moe.bias_update_rate,
        num_streams=num_streams,
        stream_embedding=moe.stream_embedding,
        backend=moe.backend,
    )


class FuxiBlock(nn.Module):
    """One FuXi block: fused projection -> multi-channel attention -> multi-stage FFN."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qk_dim: int,
        v_dim: int,
        ffn_multiply: float,
        dropout: float,
        max_len: int,
        num_time_buckets: int = 128,
        moe: MoEConfig | None = None,
        num_streams: int = 1,
        attention: str = "reference",
        attention_norm: float = 0.0,
    ):
        super().__init__()
        H = num_heads
        self.attend = select_attention(attention, "fuxi")
        self.H, self.qk_dim, self.v_dim = H, qk_dim, v_dim
        self.max_len = max_len
        self.norm = semantic_norm(attention_norm, max_len)
        self.moe_placement = moe.placement if moe is not None and moe.num_experts > 0 else None
        u_width = 3 * H * v_dim
        hidden = int(round(ffn_multiply * dim))
        # Fused bias-free projection to u | v | q | k (u by experts when placement == "u").
        proj_out = H * v_dim + 2 * H * qk_dim + (0 if self.moe_placement == "u" else u_width)
        self.uvqk = nn.Linear(dim, proj_out, bias=False)
        self.u_moe = _make_moe(moe, dim, u_width, "linear", None, False, num_streams) if self.moe_placement == "u" else None
        self.pos_w = nn.Parameter(torch.empty(max_len).normal_(std=0.02))
        self.time_w = nn.Parameter(torch.empty(num_time_buckets + 1).normal_(std=0.02))
        self.drop = Dropout(dropout)
        if self.moe_placement == "out":
            self.out_moe = _make_moe(moe, u_width, dim, "linear", None, True, num_streams)
            self.out = None
        else:
            self.out = nn.Linear(u_width, dim, bias=True)
        if self.moe_placement == "ffn":
            self.ffn_moe = _make_moe(moe, dim, dim, "swiglu", hidden, False, num_streams)
            self.ffn = None
        else:
            self.ffn = SwiGLU(dim, hidden)

    @classmethod
    def from_config(cls, cfg: ModelConfig, width: int, max_len: int, moe: MoEConfig | None = None, num_streams: int = 1) -> FuxiBlock:
        return cls(
            width,
            cfg.num_heads,
            cfg.qk_dim,
            cfg.v_dim,
            cfg.ffn_multiply,
            cfg.dropout,
            max_len,
            cfg.num_time_buckets,
            moe=moe,
            num_streams=num_streams,
            attention=cfg.attention,
            attention_norm=cfg.attention_norm,
        )

    def moe_layers(self) -> list[MoE]:
        return [m for m in (getattr(self, "u_moe", None), getattr(self, "out_moe", None), getattr(self, "ffn_moe", None)) if m is not None]

    def forward(
        self,
        x: torch.Tensor,
        buckets: torch.Tensor | None,
        valid: torch.Tensor | None = None,
        stream: torch.Tensor | None = None,
        groups: int = 1,
        lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x (B, N, D); buckets (B / groups, N, N) temporal bucket ids or None (temporal channel
        off): each run of ``groups`` consecutive rows of x shares one row of buckets (Fuxi-MME's
        streams of one sequence); valid (B, N) bool; stream (B, N) stream index; lengths
        (B / groups,) real positions per sequence (padding after them) or None."""
        B, N, _ = x.shape
        H, Dq, Dv = self.H, self.qk_dim, self.v_dim
        xn = rms_norm(x)
        proj = F.silu(self.uvqk(xn))
        if self.u_moe is not None:
            u = F.silu(self.u_moe(xn, valid, stream))
            v, q, k = proj.split([H * Dv, H * Dq, H * Dq], dim=-1)
        else:
            u, v, q, k = proj.split([3 * H * Dv, H * Dv, H * Dq, H * Dq], dim=-1)
        q = q.view(B, N, H, Dq).transpose(1, 2)
        k = k.view(B, N, H, Dq).transpose(1, 2)
        v = v.view(B, N, H, Dv).transpose(1, 2)
        if groups > 1:
            # the rows sharing a bucket map become extra heads of one row: the bias channels
            # (and their table lookups and gradients) are computed once per sequence, not per stream
            q, k, v = (t.reshape(B // groups, groups * H, N, t.shape[-1]) for t in (q, k, v))
        # (B, N, 3*H*Dv), row b*g + m for group m: the fused kernels write it in that layout
        attn = self.attend(q, k, v, self.pos_w, self.time_w, buckets, self.norm, lengths, groups)
        h = rms_norm(attn) * u
        hd = self.drop(h)
        o = (self.out_moe(hd, valid, stream) if self.out is None else self.out(hd)) + x
        z = self.drop(rms_norm(o))
        return (self.ffn_moe(z, valid, stream) if self.ffn is None else self.ffn(z)) + o


def decoder(
    cfg: ModelConfig, width: int, max_len: int, moe: MoEConfig | None = None, num_streams: int = 1
) -> tuple[nn.ModuleList, nn.ModuleList | None]:
    """One stack of ``model.num_layers`` blocks under ``model.mixer``, and the state-space blocks
    that follow each of them (``hybrid``; else None). Under ``ssm`` an MoE replaces the blocks'
    SwiGLU (placement ffn); under ``hybrid`` the FuXi blocks carry it and the SSM blocks do not."""
    check_ssm_config(cfg)
    L = cfg.num_layers
    if cfg.mixer == "ssm":
        if moe is not None and moe.placement != "ffn":
            raise ConfigError(f"model.moe.placement={moe.placement!r} needs attention blocks; use ffn with model.mixer=ssm")
        hidden = int(round(cfg.ffn_multiply * width))
        make = (lambda: _make_moe(moe, width, width, "swiglu", hidden, False, num_streams)) if moe is not None else (lambda: None)
        return nn.ModuleList(SSMBlock(cfg, width, max_len, make()) for _ in range(L)), None
    blocks = nn.ModuleList(FuxiBlock.from_config(cfg, width, max_len, moe, num_streams) for _ in range(L))
    ssm = nn.ModuleList(SSMBlock(cfg, width, max_len) for _ in range(L)) if cfg.mixer == "hybrid" else None
    return blocks, ssm


def run_decoder(
    blocks: nn.ModuleList,
    ssm_blocks: nn.ModuleList | None,
    x: torch.Tensor,
    buckets: torch.Tensor | None,
    valid: torch.Tensor | None,
    stream: torch.Tensor | None = None,
    groups: int = 1,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """x (B, N, D) through one stack from :func:`decoder` (arguments as :meth:`FuxiBlock.forward`)."""
    for i, blk in enumerate(blocks):
        if isinstance(blk, SSMBlock):
            assert valid is not None
            x = blk(x, valid, stream)
        else:
            x = blk(x, buckets, valid, stream, groups=groups, lengths=lengths)
        if ssm_blocks is not None:
            assert valid is not None
            x = ssm_blocks[i](x, valid, stream)
    return x


class FuxiAlpha(SequenceModel):
    """Item input layer -> L FuXi blocks -> L2-normalised user vectors (no final norm)."""

    def __init__(self, cfg: ModelConfig, num_items: int, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.temporal = TemporalBuckets(cfg)
        self.input = ItemInput(num_items, cfg.dim, max_len, cfg.dropout, behaviors=cfg.use_behavior)
        self.mixer = cfg.mixer
        blocks, ssm_blocks = decoder(cfg, cfg.dim, max_len)
        self.blocks = blocks
        if ssm_blocks is not None:  # under attention no key is added: checkpoints are unchanged
            self.ssm_blocks = ssm_blocks
        denoise = make_denoise(cfg.denoise, cfg.dim, max_len, cfg.denoise_weight)
        if denoise is not None:  # model.denoise=none adds no key (docs/models.md#noise-decoupling)
            self.denoise = denoise

    def forward(self, ids: torch.Tensor, ts: torch.Tensor, query_ts: torch.Tensor, behaviors: torch.Tensor | None = None) -> torch.Tensor:
        x = self.input(ids, behaviors)
        if hasattr(self, "denoise"):
            x = self.denoise(x, ids != 0)
        buckets = self.temporal(ts, query_ts) if self.mixer != "ssm" else None
        lengths = sequence_lengths(ids)
        valid = ids != 0 if self.mixer != "attention" else None
        x = run_decoder(self.blocks, getattr(self, "ssm_blocks", None), x, buckets, valid, lengths=lengths)
        return l2_normalize(x)

    def item_vectors(self) -> torch.Tensor:
        return l2_normalize(self.input.item_emb.weight)

    # model.denoise=gate: its sparsity penalty is the auxiliary loss (docs/models.md#noise-decoupling)
    def aux_loss(self) -> torch.Tensor | None:
        return denoise_penalty(getattr(self, "denoise", None))

    def release_aux_graphs(self) -> None:
        release_denoise(getattr(self, "denoise", None))

    def independent_length_chunks(self) -> bool:
        return not isinstance(getattr(self, "denoise", None), TokenGate)  # the penalty is a mean over the whole batch

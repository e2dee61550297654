"""Pointwise (softmax-free) attention of FuXi-alpha and HSTU: plain PyTorch references.

Legend: B batch, H heads, N positions, Dq / Dv per-head widths.

Both take ``q, k`` (B, H, N, Dq), ``v`` (B, H, N, Dv), the learned bias tables and the
temporal bucket ids from :class:`~fuxi_mme.models.common.TemporalBuckets` (computed once per
forward, shared by all blocks), and are exactly the equations of docs/models.md#attention-channels and #hstu. They
are the reference every fused kernel is tested against.

``lengths`` (B,) optional: each sequence's real positions, padding after them (the layout of
every batch here). Output rows at padding are then zero. Attention is causal, so the real
rows are the same with or without it; what it buys is that the fused kernels skip padding's
tiles (about half of all positions at ML-20M), and every path agrees on the padding rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..common import causal_mask
from .shared import lookup, relative_position_bias, row_mask, ungroup


def fuxi_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_w: torch.Tensor,
    time_w: torch.Tensor,
    buckets: torch.Tensor | None,
    norm: float,
    lengths: torch.Tensor | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """FuXi-alpha adaptive multi-channel attention. Returns (B, N, 3*H*Dv), channel-major
    (semantic heads, then positional heads, then temporal heads). ``groups`` G > 1: the H heads
    are G groups of H/G (Fuxi-MME's streams of one sequence, sharing its bias maps) and the
    result is (B*G, N, 3*H/G*Dv), row b*G + g holding group g's heads, channel-major. ``buckets`` (B, N, N) comes
    from :class:`~fuxi_mme.models.common.TemporalBuckets`; ``None`` turns the temporal channel off (its output is zero),
    e.g. for datasets without timestamps."""
    B, H, N, _ = q.shape
    mask = causal_mask(N, q.device).to(q.dtype)
    a_sem = F.silu(q @ k.transpose(-1, -2)).mul_(mask / norm)  # (B, H, N, N); in place: silu keeps its input
    a_pos = relative_position_bias(pos_w, N).to(q.dtype) * mask  # (N, N)
    out_sem = a_sem @ v
    out_pos = a_pos @ v  # broadcast over B, H
    if buckets is not None:
        a_time = lookup(time_w, buckets).to(q.dtype).mul_(mask)  # (B, N, N)
        out_time = a_time.unsqueeze(1) @ v
    else:
        out_time = torch.zeros_like(out_sem)
    out = torch.cat([out_sem, out_pos, out_time], dim=1)  # (B, 3H, N, Dv)
    return ungroup(_zero_padding(out.transpose(1, 2).reshape(B, N, 3 * H * v.shape[-1]), lengths), 3, groups)


def hstu_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    pos_w: torch.Tensor,
    time_w: torch.Tensor,
    buckets: torch.Tensor | None,
    norm: float,
    lengths: torch.Tensor | None = None,
    groups: int = 1,
) -> torch.Tensor:
    """HSTU: A = phi(q k^T + rel_pos + rel_time) / N, causal. Returns (B, N, H*Dv)."""
    B, H, N, _ = q.shape
    mask = causal_mask(N, q.device).to(q.dtype)
    logits = q @ k.transpose(-1, -2) + relative_position_bias(pos_w, N).to(q.dtype)
    if buckets is not None:
        logits = logits + lookup(time_w, buckets).to(q.dtype).unsqueeze(1)
    a = F.silu(logits).mul_(mask / norm)
    return ungroup(_zero_padding((a @ v).transpose(1, 2).reshape(B, N, H * v.shape[-1]), lengths), 1, groups)


def _zero_padding(out: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, N, C) with the rows past each sequence's length set to zero."""
    if lengths is None:
        return out
    return out * row_mask(lengths, out.shape[1])[:, :, None].to(out.dtype)

"""Pointwise (softmax-free) attention of FuXi-alpha and HSTU: plain PyTorch references.

Legend: B batch, H heads, N positions, Dq / Dv per-head widths.

Both take ``q, k`` (B, H, N, Dq), ``v`` (B, H, N, Dv), the learned bias tables and the
temporal bucket ids from :class:`~fuxi_mme.models.common.TemporalBuckets` (computed once per
forward, shared by all blocks), and are exactly the equations of SPEC sections 2 and 3. They
are the reference every fused kernel is tested against.

``lengths`` (B,) optional: each sequence's real positions, padding after them (the layout of
every batch here). Output rows at padding are then zero. Attention is causal, so the real
rows are the same with or without it; what it buys is that the fused kernels skip padding's
tiles (about half of all positions at ML-20M), and every path agrees on the padding rows.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .common import causal_mask


def small_table_grad(idx: torch.Tensor, grad: torch.Tensor, n: int) -> torch.Tensor:
    """fp32 ``g`` of length ``n`` with ``g[b] = sum(grad[idx == b])``, for a small ``n`` and a
    large ``idx`` (e.g. B*N*N temporal bucket ids into 129 buckets).

    Accumulating straight into ``n`` addresses makes millions of atomic adds collide on the same
    few words (``index_add_`` took 3 ms a layer on an H100 at the ML-1M shape; the sort-based
    ``index_put_`` that plain indexing uses, ~100 ms). Here each row of ``idx``'s last
    dimension accumulates into its own private ``n`` bins (``scatter_add_`` into a
    (rows, n) buffer, collisions only within a row), and the rows are summed. Deterministic
    mode keeps ``index_add_``, whose deterministic CUDA path is implemented.
    """
    idx, grad = idx.reshape(-1, idx.shape[-1] if idx.dim() > 1 else idx.numel()), grad.reshape(-1).float()
    if (torch.are_deterministic_algorithms_enabled() and idx.is_cuda) or idx.shape[1] < 16:
        return torch.zeros(n, dtype=torch.float32, device=grad.device).index_add_(0, idx.reshape(-1), grad)
    buf = torch.zeros(idx.shape[0], n, dtype=torch.float32, device=grad.device)
    return buf.scatter_add_(1, idx, grad.view(idx.shape)).sum(0)


class _SmallTableLookup(torch.autograd.Function):
    """``table[idx]`` for a small 1-D table and a large index tensor.

    Plain indexing back-propagates through ``index_put_(accumulate=True)``, which on CUDA
    sorts the indices and then walks each index's duplicates serially: with B*N*N indices
    into 129 temporal buckets that took ~300 ms a step on an H200. :func:`small_table_grad`
    gives the same gradient in a fraction of a millisecond.
    """

    @staticmethod
    def forward(ctx, table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(idx)
        ctx.n = table.shape[0]
        return table[idx]

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (idx,) = ctx.saved_tensors
        return small_table_grad(idx, grad, ctx.n).to(grad.dtype), None


def lookup(table: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """``table[idx]`` with a gradient that scales to millions of duplicate indices."""
    if not torch.is_grad_enabled() or torch.jit.is_tracing() or not table.requires_grad:
        return table[idx]  # inference and export: plain indexing (traceable, no custom op)
    return _SmallTableLookup.apply(table, idx)


def relative_positions(n: int, device) -> torch.Tensor:
    """(N, N) indices i - j into the positional table, clamped at 0 above the diagonal."""
    idx = torch.arange(n, device=device)
    return (idx[:, None] - idx[None, :]).clamp(min=0)


def relative_position_bias(pos_w: torch.Tensor, n: int) -> torch.Tensor:
    """(N, N) with A[i, j] = pos_w[i - j] for j <= i (0 elsewhere; masked anyway)."""
    return lookup(pos_w, relative_positions(n, pos_w.device))


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


def ungroup(out: torch.Tensor, channels: int, groups: int) -> torch.Tensor:
    """(B, N, C*G*W) channel-major over G groups of heads -> (B*G, N, C*W), one row per group."""
    if groups == 1:
        return out
    B, N, _ = out.shape
    return out.view(B, N, channels, groups, -1).permute(0, 3, 1, 2, 4).reshape(B * groups, N, -1)


def row_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N) bool: position i of sequence b is one of its ``lengths[b]`` real positions."""
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


def _zero_padding(out: torch.Tensor, lengths: torch.Tensor | None) -> torch.Tensor:
    """(B, N, C) with the rows past each sequence's length set to zero."""
    if lengths is None:
        return out
    return out * row_mask(lengths, out.shape[1])[:, :, None].to(out.dtype)


def semantic_norm(attention_norm: float, max_len: int) -> float:
    """N of the semantic channel's phi(q k^T) / N: ``model.attention_norm`` when positive, else
    SPEC's padded length ``max_len``."""
    return float(attention_norm) if attention_norm > 0 else float(max_len)


def select_attention(mode: str, kind: str):
    """The attention function for ``model.attention`` (``kind``: "fuxi" or "hstu").

    ``reference`` and ``auto`` use the PyTorch reference; ``fused`` the Triton kernels
    (``fused_attention.py``, needs triton and a CUDA device, or Triton's CPU interpreter with
    ``TRITON_INTERPRET=1``). The kernels pass their GPU parity tests and use a third of the
    reference's memory. Inside the compiled bf16 training step on an H200 they are the fastest
    path at the ML-20M base shape (+5% per epoch) but mixed at ML-1M (docs/performance.md), so
    ``auto`` keeps the reference.
    """
    ref = fuxi_attention_reference if kind == "fuxi" else hstu_attention_reference
    if mode in ("reference", "auto"):
        return ref
    from . import fused_attention as fa

    if not fa.HAVE_TRITON:
        raise RuntimeError("model.attention=fused needs triton (pip install triton) and a CUDA GPU; use model.attention=reference")
    fused = fa.fused_fuxi_attention if kind == "fuxi" else fa.fused_hstu_attention

    def attend(q, k, v, pos_w, time_w, buckets, norm, lengths=None, groups=1):
        if torch.jit.is_tracing():
            return ref(q, k, v, pos_w, time_w, buckets, norm, lengths, groups)  # export traces the reference
        if not fa.fused_available(q.device):
            raise RuntimeError(f"model.attention=fused runs on CUDA tensors (got {q.device}); use model.attention=reference on CPU")
        return fused(q, k, v, pos_w, time_w, buckets, norm, lengths, groups)

    return attend

"""What every attention path shares: the bias tables' lookup with a gradient that scales to
millions of duplicate indices, relative positions, the padding-row mask, the grouped-head
layout, and the semantic channel's normaliser.

Legend: B batch, H heads, N positions, G head groups, C channels, W per-channel width.

Used by the PyTorch reference (``reference.py``) and the fused kernels (``fused.py``), which
therefore do not import each other.
"""

from __future__ import annotations

import torch


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
    if not torch.is_grad_enabled() or not table.requires_grad:
        return table[idx]  # inference and export (run without grad): plain indexing, no custom op
    return _SmallTableLookup.apply(table, idx)


def relative_positions(n: int, device) -> torch.Tensor:
    """(N, N) indices i - j into the positional table, clamped at 0 above the diagonal."""
    idx = torch.arange(n, device=device)
    return (idx[:, None] - idx[None, :]).clamp(min=0)


def relative_position_bias(pos_w: torch.Tensor, n: int) -> torch.Tensor:
    """(N, N) with A[i, j] = pos_w[i - j] for j <= i (0 elsewhere; masked anyway)."""
    return lookup(pos_w, relative_positions(n, pos_w.device))


def ungroup(out: torch.Tensor, channels: int, groups: int) -> torch.Tensor:
    """(B, N, C*G*W) channel-major over G groups of heads -> (B*G, N, C*W), one row per group."""
    if groups == 1:
        return out
    B, N, _ = out.shape
    return out.view(B, N, channels, groups, -1).permute(0, 3, 1, 2, 4).reshape(B * groups, N, -1)


def row_mask(lengths: torch.Tensor, n: int) -> torch.Tensor:
    """(B, N) bool: position i of sequence b is one of its ``lengths[b]`` real positions."""
    return torch.arange(n, device=lengths.device)[None, :] < lengths[:, None]


def semantic_norm(attention_norm: float, max_len: int) -> float:
    """N of the semantic channel's phi(q k^T) / N: ``model.attention_norm`` when positive, else
    the padded length ``max_len`` (docs/models.md#attention-channels)."""
    return float(attention_norm) if attention_norm > 0 else float(max_len)

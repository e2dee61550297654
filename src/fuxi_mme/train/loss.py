"""Sampled softmax with uniform negatives (SPEC section 2).

Legend: B batch, N positions, D scoring width, K negatives, I items.

For each valid position: logits = score(user, item) / temperature over [positive, K negatives
drawn uniformly from 1..I independently per position]; a negative equal to the positive is
masked out; the loss is the mean over valid positions. For the cosine models the score is the
dot product of unit vectors (the models return normalised vectors).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_negatives(shape: tuple[int, ...], num_items: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform item ids in 1..num_items (never padding)."""
    return torch.randint(1, num_items + 1, shape, device=device, generator=generator)


def sampled_softmax_loss(
    user_BND: torch.Tensor,
    targets_BN: torch.Tensor,
    items_ID: torch.Tensor,
    negatives_BNK: torch.Tensor,
    temperature: float,
    method: str = "auto",
    normalizer: float | None = None,
) -> torch.Tensor:
    """Mean sampled-softmax loss over positions with ``targets != 0``; no host syncs.

    ``normalizer`` replaces the local count of valid positions as the divisor (multi-process
    training divides by the global count over the number of ranks).

    Two equivalent ways to get the negative logits: ``gather`` the K negative embeddings per
    position (memory and work ~ B*N*K*D), or score ``all`` items and gather K logits
    (~ B*N*I). ``auto`` scores all items unless that tensor passes 2**30 elements (4 GB in
    fp32): a dense matmul plus a gather is far faster than back-propagating B*N*K row gathers
    (on CUDA those accumulate through a sort-based kernel).
    """
    valid = targets_BN != 0
    items = items_ID.to(user_BND.dtype)
    if method == "auto":
        method = "all" if targets_BN.numel() * items.shape[0] <= 2**30 else "gather"
    if method == "all":
        all_BNI = user_BND @ items.T
        pos = all_BNI.gather(-1, targets_BN.unsqueeze(-1))  # (B, N, 1)
        neg = all_BNI.gather(-1, negatives_BNK)  # (B, N, K)
    elif method == "gather":
        pos = (user_BND * F.embedding(targets_BN, items)).sum(-1, keepdim=True)
        neg = torch.einsum("bnd,bnkd->bnk", user_BND, F.embedding(negatives_BNK, items))
    else:
        raise ValueError(f"unknown loss method {method!r}; use auto, all or gather")
    neg = neg.masked_fill(negatives_BNK == targets_BN.unsqueeze(-1), float("-inf"))
    logits = torch.cat([pos, neg], dim=-1).float() / temperature
    nll = torch.logsumexp(logits, dim=-1) - logits[..., 0]
    if normalizer is not None:
        return (nll * valid).sum() / max(normalizer, 1e-9)
    return (nll * valid).sum() / valid.sum().clamp(min=1)

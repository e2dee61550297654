"""Sampled softmax with uniform negatives (docs/models.md#loss), and the full softmax.

Legend: B batch, N positions, D scoring width, K negatives, I items.

For each valid position: logits = score(user, item) / temperature over [positive, K negatives
drawn uniformly from 1..I independently per position]; a negative equal to the positive is
masked out; the loss is the mean over valid positions. For the cosine models the score is the
dot product of unit vectors (the models return normalised vectors).

``train.loss=full`` scores every item instead (a softmax over the whole catalogue, padding id
excluded, no sampling): the same dense (positions x items) product the ``all`` method computes
anyway, without the gather.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def sample_negatives(shape: tuple[int, ...], num_items: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniform item ids in 1..num_items (never padding)."""
    return torch.randint(1, num_items + 1, shape, device=device, generator=generator)


def _divide(total: torch.Tensor, normalizer: float | torch.Tensor) -> torch.Tensor:
    """``total / normalizer`` with the divisor kept off zero; a tensor divisor (the CUDA-graph
    step's static buffer) stays on the device, with no host sync."""
    if isinstance(normalizer, torch.Tensor):
        return total / normalizer.clamp_min(1e-9)
    return total / max(normalizer, 1e-9)


def negatives_per_position(train_cfg) -> int:
    """Uniform negatives to draw per position: ``num_negatives`` for the sampled loss, none for
    the full softmax."""
    return train_cfg.num_negatives if train_cfg.loss == "sampled" else 0


def _aligned_rows(items: torch.Tensor) -> torch.Tensor:
    """On CUDA, zero rows up to a multiple of 8 (never scored as candidates): the (., I) score
    matrix then has an aligned row stride and cuBLAS uses its Hopper tensor-core kernels, not
    sm75 ones."""
    if items.is_cuda and items.shape[0] % 8:
        return F.pad(items, (0, 0, 0, 8 - items.shape[0] % 8))
    return items


FULL_MAX_LOGITS = 2**30  # (positions x items) logits per block of the full softmax (4 GB in fp32)


def _full_block(user_PD, targets_P, items, mask, temperature):
    logits = (user_PD @ items.T).float() / temperature + mask
    return torch.logsumexp(logits, dim=-1) - logits.gather(-1, targets_P[:, None]).squeeze(-1)


def full_softmax_nll(user_PD: torch.Tensor, targets_P: torch.Tensor, items_ID: torch.Tensor, temperature: float) -> torch.Tensor:
    """(P,) negative log-likelihood of each target under a softmax over all items 1..I (row 0
    of ``items_ID`` is padding and never a candidate). Past ``FULL_MAX_LOGITS`` logits (large
    catalogues) the positions go in blocks, each recomputed in the backward pass instead of
    kept, so memory stays at one block's logits."""
    I1 = items_ID.shape[0]
    items = _aligned_rows(items_ID.to(user_PD.dtype))  # the extra rows are masked below
    # built with where, not by item assignment: setting an element copies a host scalar, which
    # synchronises and so cannot be recorded in a CUDA graph
    ar = torch.arange(items.shape[0], device=items.device)
    mask = torch.where((ar == 0) | (ar >= I1), float("-inf"), 0.0)
    P = user_PD.shape[0]
    if P * items.shape[0] <= FULL_MAX_LOGITS:
        return _full_block(user_PD, targets_P, items, mask, temperature)
    from torch.utils.checkpoint import checkpoint

    rows = max(1, FULL_MAX_LOGITS // items.shape[0])
    return torch.cat(
        [
            checkpoint(
                _full_block, user_PD[s : s + rows], targets_P[s : s + rows], items, mask, temperature, use_reentrant=False, preserve_rng_state=False
            )  # no randomness inside; reading the RNG state would sync
            for s in range(0, P, rows)
        ]
    )


def sampled_softmax_loss(
    user_BND: torch.Tensor,
    targets_BN: torch.Tensor,
    items_ID: torch.Tensor,
    negatives_BNK: torch.Tensor,
    temperature: float,
    method: str = "auto",
    normalizer: float | torch.Tensor | None = None,
    positions: torch.Tensor | None = None,
    full: bool = False,
) -> torch.Tensor:
    """Mean sampled-softmax loss over positions with ``targets != 0``; no host syncs.

    ``normalizer`` replaces the local count of valid positions as the divisor (multi-process
    training divides by the global count over the number of ranks). ``positions`` (flat
    indices into B*N of the positions with a target, computed by the caller on the host) makes
    the loss skip padding entirely; the result is the same.

    Two equivalent ways to get the negative logits: ``gather`` the K negative embeddings per
    position (memory and work ~ B*N*K*D), or score ``all`` items and gather K logits
    (~ B*N*I). ``auto`` scores all items unless that tensor passes 2**30 elements (4 GB in
    fp32): a dense matmul plus a gather is far faster than back-propagating B*N*K row gathers
    (on CUDA those accumulate through a sort-based kernel).
    """
    if positions is not None:  # (P,) rows only: padding never reaches the (P, I) logits
        D = user_BND.shape[-1]
        user_BND = user_BND.reshape(-1, D).index_select(0, positions).unsqueeze(0)
        targets_BN = targets_BN.reshape(-1).index_select(0, positions).unsqueeze(0)
        negatives_BNK = negatives_BNK.flatten(0, -2).index_select(0, positions).unsqueeze(0)  # also K = 0
    valid = targets_BN != 0
    if full:  # softmax over the whole catalogue; ``negatives_BNK`` is not used
        safe = torch.where(valid, targets_BN, 1)  # padding positions score item 1 (finite), then weigh 0
        nll = full_softmax_nll(user_BND.reshape(-1, user_BND.shape[-1]), safe.reshape(-1), items_ID, temperature).view(targets_BN.shape)
        if normalizer is not None:
            return _divide((nll * valid).sum(), normalizer)
        return (nll * valid).sum() / valid.sum().clamp(min=1)
    items = items_ID.to(user_BND.dtype)
    if method == "auto":
        method = "all" if targets_BN.numel() * items.shape[0] <= 2**30 else "gather"
        if method == "all" and positions is not None and not user_BND.is_cuda:
            method = "chunked"  # CPU: the same logits, block by block from the sampled rows
    ids_BNS = torch.cat([targets_BN.unsqueeze(-1), negatives_BNK], dim=-1)  # [target, negatives]
    if method == "chunked":
        if positions is None:
            raise ValueError("loss method 'chunked' needs the target positions (positions=...)")
        total = _BlockedSampledLoss.apply(user_BND.reshape(-1, user_BND.shape[-1]), items, ids_BNS.reshape(-1, ids_BNS.shape[-1]), float(temperature))
        return _divide(total, normalizer if normalizer is not None else float(targets_BN.numel()))
    if method == "all":
        items = _aligned_rows(items)  # the extra rows are never gathered
        # one gather for [target, negatives]: its backward fills one (B, N, I) gradient, not two
        raw = (user_BND @ items.T).gather(-1, ids_BNS)
    elif method == "gather":
        raw = torch.einsum("bnd,bnsd->bns", user_BND, F.embedding(ids_BNS, items))
    else:
        raise ValueError(f"unknown loss method {method!r}; use auto, all, gather or chunked")
    logits = _sampled_logits(raw, ids_BNS, temperature)
    nll = torch.logsumexp(logits, dim=-1) - logits[..., 0]
    if normalizer is not None:
        return _divide((nll * valid).sum(), normalizer)
    return (nll * valid).sum() / valid.sum().clamp(min=1)


def position_softmax_loss(
    user_PD: torch.Tensor,
    targets_P: torch.Tensor,
    items_ID: torch.Tensor,
    negatives_PK: torch.Tensor,
    temperature: float,
    normalizer: float | torch.Tensor,
    full: bool = False,
    padded: bool = False,
) -> torch.Tensor:
    """The loss over P positions already picked out of the batch: the sum of their NLLs over
    ``normalizer``. With ``padded`` some entries are padding (target 0, weight 0: the CUDA-graph
    step's bucket). On the CPU the sampled loss of unpadded positions goes block by block
    (``chunked``: the same numbers without the (P, I) score matrix)."""
    if not full and not padded and not user_PD.is_cuda and user_PD.shape[0] * items_ID.shape[0] <= 2**30:
        ids_PS = torch.cat([targets_P[:, None], negatives_PK], dim=-1)  # [target, negatives]
        total = _BlockedSampledLoss.apply(user_PD, items_ID.to(user_PD.dtype), ids_PS, float(temperature))
        return _divide(total, normalizer)
    return sampled_softmax_loss(user_PD[None], targets_P[None], items_ID, negatives_PK[None], temperature, normalizer=normalizer, full=full)


CHUNK_ROWS = 2048  # positions per block of the dense item-gradient product
GATHER_ROWS = 256  # positions per block of gathered item rows: (256, 1+K, D) stays in cache
# Above this many items the backward scatters each position's 1+K coefficients (P x (1+K) x D)
# instead of the two dense (positions x items) products (P x I x D). Measured on the 2-core CPU
# (P 12,000, K 128, D 50): the scatter takes 0.04-0.16 s from 3.7k to 330k items, the dense
# products 0.11 s at 3.7k, 0.40 s at 20k and 10 s at 330k. The dense path is kept below 20,000
# items, where every shipped CPU figure was measured with it; both agree to 1e-5.
SPARSE_ITEMS = 20_000


def _sampled_logits(raw: torch.Tensor, ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """(..., 1+K) scores of [target, negatives] -> logits / temperature in fp32, with every
    negative equal to the target masked out (the one rule shared by every loss path)."""
    logits = raw.float()  # a copy when raw is bf16; the masked fill below must not touch raw
    if logits is raw:
        logits = logits.clone()
    logits[..., 1:].masked_fill_(ids[..., 1:] == ids[..., :1], float("-inf"))
    return logits / temperature


class _BlockedSampledLoss(torch.autograd.Function):
    """Sum of the sampled-softmax NLL over P positions, for the CPU, block by block.

    The same numbers as the dense ``all`` path without its (P, I) score matrix. Only the 1+K
    sampled logits of a position are needed, so they are computed from the gathered item rows
    (a (256, 1+K, D) block that stays in cache). Both gradients scatter the (P, 1+K)
    coefficients into a (2048, I) block, which is fastest as two dense products per block.
    Against scoring all items (three (P, I, D) products) that removes one of the three
    (docs/performance.md). The forward keeps the (P, 1+K) softmax for the backward.
    """

    @staticmethod
    def forward(ctx, u_PD, items_ID, sel_PS, temperature):
        """``sel_PS``: (P, 1+K) item ids, the target first."""
        total = torch.zeros((), dtype=torch.float32, device=u_PD.device)
        probs = []
        for s in range(0, u_PD.shape[0], GATHER_ROWS):
            sel = sel_PS[s : s + GATHER_ROWS]
            rows = items_ID.index_select(0, sel.reshape(-1)).view(*sel.shape, -1)  # (C, S, D)
            logits = _sampled_logits(torch.bmm(rows, u_PD[s : s + GATHER_ROWS, :, None]).squeeze(-1), sel, temperature)  # (C, S)
            lse = torch.logsumexp(logits, dim=1)
            total += (lse - logits[:, 0]).sum()
            probs.append(torch.exp(logits - lse[:, None]))
        ctx.save_for_backward(u_PD, items_ID, torch.cat(probs) if probs else u_PD.new_zeros(0, 1), sel_PS)
        ctx.temperature = temperature
        return total

    @staticmethod
    def backward(ctx, g):
        u_PD, items_ID, p_PS, sel_PS = ctx.saved_tensors
        d_PS = p_PS.clone()
        d_PS[:, 0] -= 1.0
        d_PS *= g / ctx.temperature
        d_PS = d_PS.to(u_PD.dtype)
        grad_u = torch.empty_like(u_PD)
        grad_items = torch.zeros_like(items_ID, dtype=torch.float32)
        I = items_ID.shape[0]
        if I > SPARSE_ITEMS:  # a large catalogue: the dense products would cost P x I x D
            for s in range(0, u_PD.shape[0], GATHER_ROWS):
                d, sel = d_PS[s : s + GATHER_ROWS], sel_PS[s : s + GATHER_ROWS]
                rows = items_ID.index_select(0, sel.reshape(-1)).view(*sel.shape, -1)  # (C, S, D)
                grad_u[s : s + GATHER_ROWS] = torch.bmm(d[:, None, :], rows).squeeze(1)
                grad_items.index_add_(0, sel.reshape(-1), (d[:, :, None] * u_PD[s : s + GATHER_ROWS, None, :]).reshape(-1, u_PD.shape[1]).float())
            return grad_u, grad_items.to(items_ID.dtype), None, None
        # one (CHUNK_ROWS, I) buffer, zeroed once: after each block only the entries it touched
        # are reset (a fresh 30 MB buffer a block spent most of its time in page faults)
        buf = torch.zeros(min(CHUNK_ROWS, u_PD.shape[0]), I, dtype=d_PS.dtype, device=d_PS.device)
        for s in range(0, u_PD.shape[0], CHUNK_ROWS):
            d, sel = d_PS[s : s + CHUNK_ROWS], sel_PS[s : s + CHUNK_ROWS]
            dense = buf[: d.shape[0]]
            dense.scatter_add_(1, sel, d)
            grad_items += (dense.T @ u_PD[s : s + CHUNK_ROWS]).float()
            grad_u[s : s + CHUNK_ROWS] = dense @ items_ID
            dense.scatter_(1, sel, 0.0)
        return grad_u, grad_items.to(items_ID.dtype), None, None

"""Grouping a Mixture-of-Experts layer's token-expert assignments by expert (``moe.py``'s
``batched`` back end): where each assignment goes (by counting or a stable sort), the routers'
top-k by rounds of argmax, and the row permutations whose backward is a gather.

Legend: T tokens, D width, E experts, K top-k, A = T*K token-expert assignments.
"""

from __future__ import annotations

import torch


def group_ends(sorted_ids: torch.Tensor, n: int) -> torch.Tensor:
    """End offset of each id's group in an ascending id tensor: ``cumsum(bincount(ids, n))``,
    by binary search, so with no host sync (``bincount`` on CUDA reads the maximum back) and
    so inside a CUDA graph."""
    return torch.searchsorted(sorted_ids, torch.arange(n, device=sorted_ids.device, dtype=sorted_ids.dtype), right=True)


# Counting (``_running_counts``, O(A * E) int32 work) is used up to this many experts; above it, a stable sort.
COUNTING_MAX_EXPERTS = 32


def dispatch_plan(expert_A: torch.Tensor, n_experts: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where each token-expert assignment goes when assignments are grouped by expert, stably
    (within an expert, in assignment order): ``dest_A`` (assignment -> slot), its inverse
    ``slot_to_A`` (slot -> assignment) and the groups' end offsets ``ends_E``.

    With few experts the slots come from counting (a running count per expert,
    :func:`_running_counts`), not from a sort; both are exact, with no host sync, so they run inside CUDA
    graphs. Equal to ``argsort(expert_A, stable=True)`` (tested)."""
    A = expert_A.numel()
    dev = expert_A.device
    if A == 0:
        empty = expert_A.new_zeros(0)
        return empty, empty, torch.zeros(n_experts, dtype=torch.long, device=dev)
    if n_experts <= COUNTING_MAX_EXPERTS:
        rank_A, counts_E = _running_counts(expert_A, n_experts)
        ends_E = counts_E.cumsum(0)
        dest_A = (ends_E - counts_E)[expert_A] + rank_A
        slot_to_A = torch.empty_like(dest_A).scatter_(0, dest_A, torch.arange(A, device=dev))
        return dest_A, slot_to_A, ends_E
    slot_to_A = torch.argsort(expert_A, stable=True)
    dest_A = torch.empty_like(slot_to_A).scatter_(0, slot_to_A, torch.arange(A, device=dev))
    return dest_A, slot_to_A, group_ends(expert_A[slot_to_A], n_experts)


def _running_counts(expert_A: torch.Tensor, n_experts: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Each assignment's rank among the earlier assignments of its expert, and every expert's
    count. A running count per expert is a scan; scanned along a long first axis, CUDA (and
    Inductor) walk it nearly serially (0.3 s for 1.6M assignments), so it runs in two levels:
    inside chunks of ``chunk`` assignments (one row per chunk and expert, all in parallel), then
    over the chunks' totals (one row per expert)."""
    A, E, dev = expert_A.numel(), n_experts, expert_A.device
    nc = -(-A // chunk)
    ids = torch.cat([expert_A, expert_A.new_full((nc * chunk - A,), E)])  # the tail matches no expert
    hits = (ids.view(nc, 1, chunk) == torch.arange(E, device=dev).view(1, E, 1)).to(torch.int32)  # (chunks, E, chunk)
    within = hits.cumsum(-1, dtype=torch.int32)  # inclusive, inside each chunk
    totals = within[:, :, -1]  # (chunks, E)
    before = totals.t().cumsum(-1, dtype=torch.int32).t() - totals  # earlier chunks' totals
    pos = torch.arange(A, device=dev)
    c = pos // chunk  # each assignment's chunk
    rank_A = within.reshape(-1)[(c * E + expert_A) * chunk + pos % chunk].long() + before.reshape(-1)[c * E + expert_A].long() - 1
    return rank_A, (before[-1] + totals[-1]).long()


# Routers with at most this many (experts, choices) pick their top-k by rounds of argmax
# (``top_k_indices``); larger ones use ``topk``.
ARGMAX_TOP_K = (64, 4)


def top_k_indices(x: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries along the last axis, largest first (as
    ``x.topk(k).indices``; ties to the lowest index), by ``k`` rounds of argmax. For the few
    experts of a router (``ARGMAX_TOP_K``): ``topk`` on CUDA runs a radix select and a sort per
    call (0.28 ms a step at ML-20M for 4 experts on an H200, under the profiler), where argmax
    is one reduction that torch.compile fuses with its neighbours."""
    picks = []
    for _ in range(k):
        i = x.argmax(-1, keepdim=True)
        picks.append(i)
        if len(picks) < k:
            x = x.scatter(-1, i, float("-inf"))
    return torch.cat(picks, dim=-1)


class PermuteRows(torch.autograd.Function):
    """``x[index]`` for a permutation ``index`` with its inverse given: the backward is the
    inverse gather, not the scatter-add that plain indexing's backward runs (a sort or atomics
    there; neither is needed for a permutation)."""

    @staticmethod
    def forward(ctx, x, index, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, index)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class DispatchRows(torch.autograd.Function):
    """Token rows in expert order: slot s holds the token of assignment ``slot_to_A[s]`` (token
    t has assignments t*K .. t*K+K-1). Backward: each token's gradient is the sum of its K
    slots' rows, gathered through ``dest_A`` (no scatter-add)."""

    @staticmethod
    def forward(ctx, x_TD, dest_A, slot_to_A, K):
        ctx.save_for_backward(dest_A)
        ctx.K = K
        return x_TD.index_select(0, torch.div(slot_to_A, K, rounding_mode="floor"))

    @staticmethod
    def backward(ctx, grad):
        (dest_A,) = ctx.saved_tensors
        g = grad.index_select(0, dest_A)
        return g.view(-1, ctx.K, g.shape[-1]).sum(1), None, None, None

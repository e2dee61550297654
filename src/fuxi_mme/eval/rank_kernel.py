"""Fused full ranking: each target's rank among all items without writing a score to memory
(``eval.ranking=fused``; docs/training.md#fused-ranking).

The reference (``eval.ranking=scores``, :func:`fuxi_mme.eval.evaluator.rank_split`) writes a
(users x items) score matrix per batch and compares it with each target's score: at 1e7 items
that is 4 GB per 107 users, so ranking 2e7 users moves about 1.6 PB through GPU memory. Here one
Triton kernel keeps a block of users' vectors in registers, streams item tiles past them,
scores each tile with one matrix product and adds up, per user, how many items score above the
target (a NaN candidate counts as above, as in the reference); scores never leave the chip.

Ranks equal the reference's on the same scores. Rounding can differ between two ways of
computing a dot product, so every score that is compared here comes from the same tile product:
the target's own score (the threshold) and the history items' scores come from
:func:`pair_scores`, which runs the same ``tl.dot`` on tiles of the same shape, width and
precision as the counting kernel, and the target's own column is skipped by index, never by
value. History masking (``eval.history=mask``) subtracts the (distinct) history items that
counted as above; a target that is itself a history item is masked (worst rank), as in the
reference.

Legend: B users, I items (+1 padding column 0, never a candidate), D scoring width, P pairs.
"""

from __future__ import annotations

import math

import torch

from ..utils.triton_support import HAVE_TRITON, interpreting, tl, triton

MAX_WIDTH = 256  # widest scoring vector the kernels take (wider: eval.ranking=scores)


def tiles(width: int) -> tuple[int, int, int, int]:
    """(users per block, items per tile, padded width, warps) for a scoring ``width``; both
    kernels use the same, so their products round alike."""
    bd = max(16, 1 << math.ceil(math.log2(max(width, 1))))
    if bd <= 64:
        return 128, 128, bd, 8
    if bd <= 128:
        return 64, 64, bd, 4
    return 32, 32, bd, 4


if HAVE_TRITON:

    @triton.jit
    def _tile_dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, tl.trans(b), input_precision="ieee")
        return tl.dot(a, tl.trans(b))

    @triton.jit
    def _count_above(
        U, V, THR, TGT, OUT, B, I1, D, su, sv, PER_PROG,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """OUT[b] += #{i in this program's item range, 1 <= i < I1, i != TGT[b]:
        score(b, i) > THR[b] or score(b, i) is NaN}."""
        rows = tl.program_id(0) * BM + tl.arange(0, BM)
        live = rows < B
        dk = tl.arange(0, BD)
        u = tl.load(U + rows.to(tl.int64)[:, None] * su + dk[None, :], mask=live[:, None] & (dk[None, :] < D), other=0.0)
        thr = tl.load(THR + rows, mask=live, other=float("inf"))
        tgt = tl.load(TGT + rows, mask=live, other=-1)
        start = 1 + tl.program_id(1) * PER_PROG
        stop = tl.minimum(start + PER_PROG, I1)
        full = start + (stop - start) // BN * BN
        count = tl.zeros([BM], dtype=tl.int32)
        # "above" is not (s <= thr): true where s > thr or s is NaN (one unordered comparison);
        # a NaN threshold (a non-finite target) gets the worst rank whatever is counted
        for n0 in range(start, full, BN):  # whole tiles: no bounds mask on the items
            cols = n0 + tl.arange(0, BN)
            v = tl.load(V + cols.to(tl.int64)[:, None] * sv + dk[None, :], mask=dk[None, :] < D, other=0.0)
            s = _tile_dot(u, v, IEEE)
            above = ~(s <= thr[:, None]) & (cols[None, :] != tgt[:, None])
            count += tl.sum(above.to(tl.int32), axis=1)
        if full < stop:  # the last, partial tile
            cols = full + tl.arange(0, BN)
            ok = cols < stop
            v = tl.load(V + cols.to(tl.int64)[:, None] * sv + dk[None, :], mask=ok[:, None] & (dk[None, :] < D), other=0.0)
            s = _tile_dot(u, v, IEEE)
            above = ~(s <= thr[:, None]) & ok[None, :] & (cols[None, :] != tgt[:, None])
            count += tl.sum(above.to(tl.int32), axis=1)
        tl.atomic_add(OUT + rows, count, mask=live)

    @triton.jit
    def _pair_scores(
        U, V, ROW, COL, OUT, P, D, su, sv,
        BM: tl.constexpr, BN: tl.constexpr, BD: tl.constexpr, IEEE: tl.constexpr,
    ):  # fmt: skip
        """OUT[p] = score(ROW[p], COL[p]) from a (BM x BN) tile product, as ``_count_above``
        makes it: pair j of the block is row j and column j of the tile (BM <= BN)."""
        p = tl.program_id(0) * BM + tl.arange(0, BM)
        live = p < P
        dk = tl.arange(0, BD)
        row = tl.load(ROW + p, mask=live, other=0)
        u = tl.load(U + row.to(tl.int64)[:, None] * su + dk[None, :], mask=live[:, None] & (dk[None, :] < D), other=0.0)
        q = tl.program_id(0) * BM + tl.arange(0, BN)
        colq = tl.load(COL + q, mask=(tl.arange(0, BN) < BM) & (q < P), other=0)
        v = tl.load(V + colq.to(tl.int64)[:, None] * sv + dk[None, :], mask=(tl.arange(0, BN) < BM)[:, None] & (dk[None, :] < D), other=0.0)
        s = _tile_dot(u, v, IEEE)
        diag = tl.arange(0, BM)[:, None] == tl.arange(0, BN)[None, :]
        tl.store(OUT + p, tl.sum(tl.where(diag, s, 0.0), axis=1), mask=live)


def available(device: torch.device | str, width: int) -> str | None:
    """Why the fused ranking cannot run here, or None when it can."""
    dev = torch.device(device)
    if not HAVE_TRITON:
        return "needs triton (pip install triton)"
    if dev.type != "cuda" and not interpreting():
        return "needs a CUDA GPU"
    if width > MAX_WIDTH:
        return f"takes scoring vectors up to {MAX_WIDTH} wide, not {width}"
    return None


def _ieee() -> bool:
    """Full fp32 products unless TF32 matmuls are allowed, as for the reference's matmul."""
    return not torch.backends.cuda.matmul.allow_tf32


def pair_scores(users_BD: torch.Tensor, items_ID: torch.Tensor, rows_P: torch.Tensor, cols_P: torch.Tensor) -> torch.Tensor:
    """(P,) fp32 scores of (user row, item) pairs, rounded as :func:`count_above` rounds them."""
    out = torch.empty(len(rows_P), dtype=torch.float32, device=users_BD.device)
    if len(rows_P) == 0:
        return out
    bm, bn, bd, warps = tiles(users_BD.shape[1])
    rows_P, cols_P = rows_P.to(torch.int64).contiguous(), cols_P.to(torch.int64).contiguous()
    grid = (triton.cdiv(len(rows_P), bm),)
    _pair_scores[grid](
        users_BD, items_ID, rows_P, cols_P, out, len(rows_P), users_BD.shape[1], users_BD.stride(0), items_ID.stride(0),
        BM=bm, BN=bn, BD=bd, IEEE=_ieee(), num_warps=warps,
    )  # fmt: skip
    return out


def count_above(users_BD: torch.Tensor, items_ID: torch.Tensor, thr_B: torch.Tensor, target_B: torch.Tensor) -> torch.Tensor:
    """(B,) int32: per user, the items other than padding and the target that score above
    ``thr_B`` (or NaN)."""
    B, width = users_BD.shape
    out = torch.zeros(B, dtype=torch.int32, device=users_BD.device)
    if B == 0:
        return out
    bm, bn, bd, warps = tiles(width)
    blocks = triton.cdiv(B, bm)
    sms = torch.cuda.get_device_properties(users_BD.device).multi_processor_count if users_BD.is_cuda else 1
    tiles_total = triton.cdiv(items_ID.shape[0] - 1, bn)
    splits = max(1, min(tiles_total, triton.cdiv(4 * sms, blocks)))  # about four programs per SM
    per_prog = triton.cdiv(tiles_total, splits) * bn
    grid = (blocks, triton.cdiv(items_ID.shape[0] - 1, per_prog))
    _count_above[grid](
        users_BD, items_ID, thr_B, target_B.to(torch.int64).contiguous(), out, B, items_ID.shape[0], width,
        users_BD.stride(0), items_ID.stride(0), per_prog, BM=bm, BN=bn, BD=bd, IEEE=_ieee(), num_warps=warps,
    )  # fmt: skip
    return out


def fused_ranks(
    users_BD: torch.Tensor,
    items_ID: torch.Tensor,
    target_B: torch.Tensor,
    history: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ranks (B,) int64, masked (B,) bool, nonfinite (B,) bool), as the reference's
    ``rank_split`` gives them: rank 1 + items above the target; a target whose score is not
    finite, or (with ``history``, the (row, item) pairs of every user's history: masking) that
    is a history item, gets I + 1."""
    users_BD = users_BD.float().contiguous()
    items_ID = items_ID.float().contiguous()
    target_B = target_B.to(torch.int64)
    B, worst = len(target_B), items_ID.shape[0]
    rows_B = torch.arange(B, device=users_BD.device)
    thr = pair_scores(users_BD, items_ID, rows_B, target_B)
    bad = ~torch.isfinite(thr)
    ranks = 1 + count_above(users_BD, items_ID, thr, target_B).to(torch.int64)
    masked = torch.zeros(B, dtype=torch.bool, device=users_BD.device)
    if history is not None:
        r, it = (x.to(users_BD.device, torch.int64) for x in history)
        keys = torch.unique(r * worst + it)  # a history item counts once, however often it recurs
        r, it = keys // worst, keys % worst
        real = it != 0
        r, it = r[real], it[real]
        is_target = it == target_B[r]
        masked[r[is_target]] = True
        r, it = r[~is_target], it[~is_target]
        s = pair_scores(users_BD, items_ID, r, it)
        above = (s > thr[r]) | torch.isnan(s)
        ranks -= torch.bincount(r[above], minlength=B)
    masked &= ~bad
    ranks = torch.where(masked | bad, torch.full_like(ranks, worst), ranks)
    return ranks, masked, bad

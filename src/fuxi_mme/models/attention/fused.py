"""Fused Triton kernels for FuXi-alpha's three-channel attention and HSTU's attention.

The reference (``reference.py``) materialises (B, H, N, N) attention maps per channel; these
kernels stream key blocks through on-chip memory instead, flash-attention style (no softmax,
so no running maximum is needed: every channel is a plain weighted sum).

FuXi-alpha, per (batch b, head h), causal (j <= i), N = the normaliser (configured max_len)::

    out_sem[i] = sum_j silu(q_i . k_j) / N * v_j
    out_pos[i] = sum_j pos_w[i - j] * v_j
    out_time[i] = sum_j time_w[bucket[b, i, j]] * v_j

HSTU: ``out[i] = sum_j silu(q_i . k_j + pos_w[i - j] + time_w[bucket[b, i, j]]) / N * v_j``.

The bias tables enter as maps built once per call and shared by every head: the positional
map pos_w[i - j] (N, N, fp32) and the temporal map time_w[bucket[b, i, j]] (B, N, N, in the
inputs' dtype), so the kernels load them directly (no int64 bucket ids, no gathers).

Backward: one kernel per key block accumulates dK and dV; one per query block accumulates dQ.
The tables ``pos_w`` / ``time_w`` get their gradients straight from the operator's backward
(``table_grads``; the maps are built without autograd). FuXi-alpha's bias channels do not
depend on q or k: the gradient at (b, i, j) of a channel is ``sum_h dout_h[i] . v_h[j]``, and
the ``bias_grad`` kernel computes it tile by tile (one product over all heads) and adds it
into the tables' entries i - j and bucket[b, i, j] at once, skipping padding, so nothing
(B, N, N)-sized is written or read back. For HSTU the dQ kernel adds each head's dz into a
(B, N, N) fp32 buffer atomically, which ``shared.small_table_grad`` folds into the tables
(as FuXi-alpha's map gradients, from one batched product per channel, under deterministic
algorithms, where the unordered atomic adds of ``bias_grad`` are not allowed).

Optional split (``BIAS_CHANNELS = "matmul"``, FuXi-alpha only): the positional and temporal
channels are plain products of a bias map with v, so they can leave the kernels and run as
one (N, N) x (N, H*DV) product per sequence over all heads at once (cuBLAS, autograd for the
gradients); the kernels then compute the semantic channel alone (two products per tile
instead of four forward, three instead of five in the dK/dV kernel). Aimed at narrow heads
(Fuxi-MME's 8 of width 32 at ML-20M). Measured on an H200 at ML-20M: the kernels get faster
but the products outside cost more than they save (attention alone 0.770 against 0.590 ms for
Fuxi-MME's shape; whole training epochs level within run-to-run spread), so the default stays
"kernel" (docs/performance.md).

Padding: with ``lengths`` (each sequence's real positions, padding after them, as every batch
here is laid out) the kernels skip every tile past a sequence's length (the loops end at it)
and write zeros to its padding rows; attention is causal, so the real rows are unchanged. At
ML-20M about half of all positions are padding, and the causal triangle's tiles past the
length are most of the work.

Status: checked against the reference (values and all five gradients, fp32 and bf16) in
Triton's CPU interpreter (``TRITON_INTERPRET=1``) and on an H200 (``tests/test_fused_attention.py``).
``model.attention=fused`` selects it; ``auto`` keeps the reference, which is level with it or
faster inside the compiled training step at the ML-1M shape (docs/performance.md).
"""

from __future__ import annotations

import os

import torch

from .shared import lookup, relative_position_bias, relative_positions, row_mask, small_table_grad, ungroup

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None
    HAVE_TRITON = False


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def fused_available(device: torch.device) -> bool:
    return HAVE_TRITON and (device.type == "cuda" or interpreting())


if HAVE_TRITON:
    # Layouts (all contiguous): q, k (B*H, N, DQ); v (B*H, N, DV); the positional bias map PM
    # (N, N) in fp32 and the temporal one TM (B, N, N) in q's dtype; out / dout (B, N, C, H, DV)
    # with C = 3 channels (FuXi) or 1 (HSTU).

    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _program(H, BLOCK: tl.constexpr):
        """(block index, b*H + h, b, h, the block's row offsets) of this program."""
        pid = tl.program_id(0)
        bh = tl.program_id(1)
        return pid, bh, bh // H, bh % H, pid * BLOCK + tl.arange(0, BLOCK)

    @triton.jit
    def _rows(PTR, bh, offs, N, D, BD: tl.constexpr):
        """Pointers and mask of rows ``offs`` of head ``bh`` of a (B*H, N, D) tensor."""
        offs_d = tl.arange(0, BD)
        return PTR + bh * N * D + offs[:, None] * D + offs_d[None, :], (offs[:, None] < N) & (offs_d[None, :] < D)

    @triton.jit
    def _orows(PTR, b, h, c, offs, N, C, H, G, DV, BDV: tl.constexpr):
        """Pointers and mask of channel ``c``, head ``h``, rows ``offs`` of a (B, N, C, H, DV) tensor."""
        offs_d = tl.arange(0, BDV)
        HS = H // G  # heads per group: head h is head h % HS of group h // HS
        row = ((b * G + h // HS) * N + offs[:, None]) * C + c
        return PTR + row * HS * DV + (h % HS) * DV + offs_d[None, :], (offs[:, None] < N) & (offs_d[None, :] < DV)

    @triton.jit
    def _load_rows(PTR, bh, offs, N, D, BD: tl.constexpr):
        ptr, mask = _rows(PTR, bh, offs, N, D, BD)
        return tl.load(ptr, mask=mask, other=0.0)

    @triton.jit
    def _seq_len(LEN, b, N, HAS_LEN: tl.constexpr):
        """Real positions of sequence ``b`` (padding after them), or N without lengths."""
        L = N
        if HAS_LEN:
            L = tl.minimum(tl.load(LEN + b).to(tl.int32), N)
        return L

    @triton.jit
    def _tile(
        Q,
        K,
        V,
        PM,
        TM,
        b,
        bh,
        offs_m,
        offs_n,
        q,
        N,
        L,
        DQ,
        DV,
        HSTU: tl.constexpr,
        BIAS: tl.constexpr,
        USE_TIME: tl.constexpr,
        IEEE: tl.constexpr,
        BDQ: tl.constexpr,
        BDV: tl.constexpr,
    ):
        """k, v of key rows ``offs_n``; the pre-activation z, the mask (causal, and both rows
        inside the sequence's L real positions) and the bias maps (read only where the kernel
        uses them: ``BIAS``)."""
        k = _load_rows(K, bh, offs_n, N, DQ, BDQ)
        v = _load_rows(V, bh, offs_n, N, DV, BDV)
        s = _dot(q, tl.trans(k), IEEE)
        causal = (offs_m[:, None] >= offs_n[None, :]) & (offs_m[:, None] < L) & (offs_n[None, :] < L)
        if BIAS:  # the precomputed bias maps (no int64 bucket ids and no gathers here)
            p = tl.load(PM + offs_m[:, None] * N + offs_n[None, :], mask=causal, other=0.0).to(tl.float32)
        else:
            p = tl.zeros(s.shape, tl.float32)
        if BIAS and USE_TIME:
            t = tl.load(TM + (b * N + offs_m[:, None]) * N + offs_n[None, :], mask=causal, other=0.0).to(tl.float32)
        else:
            t = tl.zeros(s.shape, tl.float32)
        if HSTU:
            z = s + p + t
        else:
            z = s
        return k, v, z, causal, p, t

    @triton.jit
    def fwd(
        Q,
        K,
        V,
        PM,
        TM,
        LEN,
        O,
        H,
        G,
        N,
        DQ,
        DV,
        inv_norm,
        HSTU: tl.constexpr,
        BIAS_CH: tl.constexpr,
        BIAS: tl.constexpr,
        USE_TIME: tl.constexpr,
        HAS_LEN: tl.constexpr,
        IEEE: tl.constexpr,
        C: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BDQ: tl.constexpr,
        BDV: tl.constexpr,
    ):
        pid_m, bh, b, h, offs_m = _program(H, BM)
        L = _seq_len(LEN, b, N, HAS_LEN)
        q = _load_rows(Q, bh, offs_m, N, DQ, BDQ)
        acc0 = tl.zeros((BM, BDV), tl.float32)
        acc1 = tl.zeros((BM, BDV), tl.float32)
        acc2 = tl.zeros((BM, BDV), tl.float32)
        for start_n in range(0, tl.minimum((pid_m + 1) * BM, L), BN):  # none for a block of padding: zeros stored
            offs_n = start_n + tl.arange(0, BN)
            k, v, z, causal, p, t = _tile(Q, K, V, PM, TM, b, bh, offs_m, offs_n, q, N, L, DQ, DV, HSTU, BIAS, USE_TIME, IEEE, BDQ, BDV)
            a = tl.where(causal, z * tl.sigmoid(z) * inv_norm, 0.0)
            acc0 += _dot(a.to(v.dtype), v, IEEE)
            if BIAS_CH:
                acc1 += _dot(p.to(v.dtype), v, IEEE)
                if USE_TIME:
                    acc2 += _dot(t.to(v.dtype), v, IEEE)
        ptr, mask = _orows(O, b, h, 0, offs_m, N, C, H, G, DV, BDV)
        tl.store(ptr, acc0.to(O.dtype.element_ty), mask=mask)
        if BIAS_CH:
            tl.store(ptr + (H // G) * DV, acc1.to(O.dtype.element_ty), mask=mask)
            tl.store(ptr + 2 * (H // G) * DV, acc2.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd_kv(
        Q,
        K,
        V,
        PM,
        TM,
        LEN,
        DO,
        DK,
        DVp,
        H,
        G,
        N,
        DQ,
        DV,
        inv_norm,
        HSTU: tl.constexpr,
        BIAS_CH: tl.constexpr,
        BIAS: tl.constexpr,
        USE_TIME: tl.constexpr,
        HAS_LEN: tl.constexpr,
        IEEE: tl.constexpr,
        C: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BDQ: tl.constexpr,
        BDV: tl.constexpr,
    ):
        pid_n, bh, b, h, offs_n = _program(H, BN)
        L = _seq_len(LEN, b, N, HAS_LEN)
        dk = tl.zeros((BN, BDQ), tl.float32)
        dv = tl.zeros((BN, BDV), tl.float32)
        for start_m in range((pid_n * BN // BM) * BM, L, BM):  # none for a block of padding keys
            offs_m = start_m + tl.arange(0, BM)
            q = _load_rows(Q, bh, offs_m, N, DQ, BDQ)
            k, v, z, causal, p, t = _tile(Q, K, V, PM, TM, b, bh, offs_m, offs_n, q, N, L, DQ, DV, HSTU, BIAS, USE_TIME, IEEE, BDQ, BDV)
            ptr, mask = _orows(DO, b, h, 0, offs_m, N, C, H, G, DV, BDV)
            do0 = tl.load(ptr, mask=mask, other=0.0)
            sig = tl.sigmoid(z)
            a = tl.where(causal, z * sig * inv_norm, 0.0)
            dv += _dot(tl.trans(a).to(do0.dtype), do0, IEEE)
            if BIAS_CH:
                do1 = tl.load(ptr + (H // G) * DV, mask=mask, other=0.0)
                dv += _dot(tl.trans(p).to(do1.dtype), do1, IEEE)
                if USE_TIME:
                    do2 = tl.load(ptr + 2 * (H // G) * DV, mask=mask, other=0.0)
                    dv += _dot(tl.trans(t).to(do2.dtype), do2, IEEE)
            dz = tl.where(causal, _dot(do0, tl.trans(v), IEEE) * sig * (1.0 + z * (1.0 - sig)) * inv_norm, 0.0)
            dk += _dot(tl.trans(dz).to(q.dtype), q, IEEE)
        ptr, mask = _rows(DK, bh, offs_n, N, DQ, BDQ)
        tl.store(ptr, dk.to(DK.dtype.element_ty), mask=mask)
        ptr, mask = _rows(DVp, bh, offs_n, N, DV, BDV)
        tl.store(ptr, dv.to(DVp.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd_q(
        Q,
        K,
        V,
        PM,
        TM,
        LEN,
        DO,
        DQp,
        GP,
        H,
        G,
        N,
        DQ,
        DV,
        inv_norm,
        HSTU: tl.constexpr,
        BIAS_CH: tl.constexpr,
        BIAS: tl.constexpr,
        USE_TIME: tl.constexpr,
        HAS_LEN: tl.constexpr,
        IEEE: tl.constexpr,
        C: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BDQ: tl.constexpr,
        BDV: tl.constexpr,
    ):
        pid_m, bh, b, h, offs_m = _program(H, BM)
        L = _seq_len(LEN, b, N, HAS_LEN)
        q = _load_rows(Q, bh, offs_m, N, DQ, BDQ)
        ptr, mask = _orows(DO, b, h, 0, offs_m, N, C, H, G, DV, BDV)
        do0 = tl.load(ptr, mask=mask, other=0.0)
        dq = tl.zeros((BM, BDQ), tl.float32)
        for start_n in range(0, tl.minimum((pid_m + 1) * BM, L), BN):
            offs_n = start_n + tl.arange(0, BN)
            k, v, z, causal, p, t = _tile(Q, K, V, PM, TM, b, bh, offs_m, offs_n, q, N, L, DQ, DV, HSTU, BIAS, USE_TIME, IEEE, BDQ, BDV)
            sig = tl.sigmoid(z)
            dz = tl.where(causal, _dot(do0, tl.trans(v), IEEE) * sig * (1.0 + z * (1.0 - sig)) * inv_norm, 0.0)
            dq += _dot(dz.to(k.dtype), k, IEEE)
            if HSTU:  # the bias gradient is dz summed over heads: the (B, N, N) buffer, atomically
                g = (b * N + offs_m[:, None]) * N + offs_n[None, :]
                tl.atomic_add(GP + g, dz, mask=causal, sem="relaxed")  # unordered: read after the kernel
        ptr, mask = _rows(DQp, bh, offs_m, N, DQ, BDQ)
        tl.store(ptr, dq.to(DQp.dtype.element_ty), mask=mask)

    @triton.jit
    def bias_grad(
        V,
        DO,
        BKT,
        LEN,
        PG,
        TG,
        N,
        NT,
        H: tl.constexpr,
        G: tl.constexpr,
        DV: tl.constexpr,
        USE_TIME: tl.constexpr,
        HAS_LEN: tl.constexpr,
        IEEE: tl.constexpr,
        BM: tl.constexpr,
        BN: tl.constexpr,
        BW: tl.constexpr,
    ):
        """FuXi-alpha's bias-table gradients. For query rows i of one block of sequence b and
        every key j <= i < L: g_c[i, j] = sum_h do_c,h[i] . v_h[j] (one product over all heads
        at once, width H*DV, in chunks of BW), c = the positional and temporal channels, added
        into entry i - j of sequence b's row of PG and entry bucket[b, i, j] of its row of TG
        (a row per sequence: atomics collide only within it, and the sums over rows after the
        kernel stay small). The adds are relaxed (``red``, no ordering: only the sums after the
        kernel are read; Triton's default ``acq_rel`` atomics made the kernel 2-3x slower).
        Padding is skipped like the attention kernels skip it; nothing (B, N, N)-sized is
        written. H, G and DV are compile-time, so the all-heads rows load as DV-wide
        contiguous runs."""
        pid_m = tl.program_id(0)
        b = tl.program_id(1)
        L = _seq_len(LEN, b, N, HAS_LEN)
        offs_m = pid_m * BM + tl.arange(0, BM)
        HS = H // G
        W = H * DV
        for start_n in range(0, tl.minimum((pid_m + 1) * BM, L), BN):
            offs_n = start_n + tl.arange(0, BN)
            gp = tl.zeros((BM, BN), tl.float32)
            gt = tl.zeros((BM, BN), tl.float32)
            for w0 in range(0, W, BW):
                offs_w = w0 + tl.arange(0, BW)  # head offs_w // DV, column offs_w % DV
                h, d = offs_w // DV, offs_w % DV
                in_w = offs_w < W
                # do (B, G, N, 3, H/G, DV): row i of head h in channel c
                row = ((b * G + h[None, :] // HS) * N + offs_m[:, None]) * 3
                col = (h[None, :] % HS) * DV + d[None, :]
                m_do = (offs_m[:, None] < L) & in_w[None, :]
                v = tl.load(V + ((b * H + h[None, :]) * N + offs_n[:, None]) * DV + d[None, :], mask=(offs_n[:, None] < L) & in_w[None, :], other=0.0)
                do1 = tl.load(DO + (row + 1) * HS * DV + col, mask=m_do, other=0.0)
                gp += _dot(do1, tl.trans(v), IEEE)
                if USE_TIME:
                    do2 = tl.load(DO + (row + 2) * HS * DV + col, mask=m_do, other=0.0)
                    gt += _dot(do2, tl.trans(v), IEEE)
            causal = (offs_m[:, None] >= offs_n[None, :]) & (offs_m[:, None] < L)
            tl.atomic_add(PG + b * N + tl.where(causal, offs_m[:, None] - offs_n[None, :], 0), gp, mask=causal, sem="relaxed")
            if USE_TIME:
                ids = tl.load(BKT + (b * N + offs_m[:, None]) * N + offs_n[None, :], mask=causal, other=0)
                tl.atomic_add(TG + b * NT + ids, gt, mask=causal, sem="relaxed")


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))


# Launch settings per kernel variant and kernel: (query rows BM, key rows BN, num_warps,
# num_stages), the fastest of each kernel alone (GPU time of ten calls replayed in a CUDA
# graph) in the sweep of ``benchmarks/attention.py --sweep`` on an H200 at the ML-20M base
# shape with its sequence lengths (padding skipped), commit 19348ee
# (benchmarks/results/attention-NVIDIA_H200-lengths-19348ee.md); "hstu" from the sweep at
# b2fdd56 (attention-NVIDIA_H200-sweep.md). FuXi's variants have a second table for narrow
# heads (width <= 32: Fuxi-MME's 8 heads of 32 at ML-20M), where the best tiles differ. The
# interpreter uses 16 x 16 tiles.
LAUNCH = {
    "fuxi": {"fwd": (32, 32, 4, 3), "bwd_kv": (32, 32, 4, 2), "bwd_q": (64, 32, 4, 3)},
    "fuxi-d32": {"fwd": (64, 32, 4, 2), "bwd_kv": (32, 64, 4, 2), "bwd_q": (64, 32, 4, 3)},
    "hstu": {"fwd": (32, 64, 4, 2), "bwd_kv": (32, 32, 4, 2), "bwd_q": (32, 64, 4, 2)},
    # FuXi-alpha's bias-table gradients (``bias_grad``): (BM, BN, warps, stages), the fastest in
    # the sweep at 5dcee58 for both head widths; the chunk of the all-heads product is
    # BIAS_GRAD_WIDTH columns
    "fuxi-bias": {"bias_grad": (32, 64, 8, 2)},
    "fuxi-bias-d32": {"bias_grad": (32, 64, 8, 2)},
    # the semantic channel alone (BIAS_CHANNELS = "matmul")
    "fuxi-split": {"fwd": (64, 32, 4, 3), "bwd_kv": (32, 32, 4, 2), "bwd_q": (64, 32, 4, 3)},
    "fuxi-split-d32": {"fwd": (64, 32, 4, 3), "bwd_kv": (32, 64, 4, 3), "bwd_q": (64, 32, 4, 3)},
}


def launch_kind(hstu: bool, split: bool = False, dv: int = 64) -> str:
    """The ``LAUNCH`` table of a kernel variant at head width ``dv``."""
    if hstu:
        return "hstu"
    return ("fuxi-split" if split else "fuxi") + ("-d32" if dv <= 32 else "")


# FuXi-alpha's positional and temporal channels (plain products of a bias map with v): inside
# the kernels ("kernel", measured: docs/performance.md), or ("matmul") as two batched matrix
# products over all heads at once outside them, the kernels then computing the semantic
# channel only. Measured slower as a whole on an H200 (docs/performance.md); ``benchmarks/attention.py`` times both.
BIAS_CHANNELS = "kernel"


def _launch(name: str, hstu: bool, split: bool, dv: int) -> tuple[int, int, dict]:
    bm, bn, warps, stages = LAUNCH[launch_kind(hstu, split, dv)][name]
    if interpreting():
        return 16, 16, {}
    return bm, bn, dict(num_warps=warps, num_stages=stages)


def _channels(hstu: bool, split: bool) -> int:
    """Output channels of the kernels: FuXi-alpha's three, or one (HSTU; FuXi-alpha's semantic
    channel alone when its bias channels are products outside, ``split``)."""
    return 1 if hstu or split else 3


def _consts(q, v, hstu, use_time, bm, bn, split, has_len):
    bias_ch = not hstu and not split
    return dict(
        HSTU=hstu,
        BIAS_CH=bias_ch,
        BIAS=hstu or bias_ch,
        USE_TIME=use_time,
        HAS_LEN=has_len,
        IEEE=q.dtype == torch.float32,
        C=_channels(hstu, split),
        BM=bm,
        BN=bn,
        BDQ=_pow2(q.shape[-1]),
        BDV=_pow2(v.shape[-1]),
    )


def _tmap_arg(tmap, pmap):
    return tmap if tmap is not None else pmap  # not read without the temporal channel


def _len_arg(lengths, q):
    return lengths if lengths is not None else q  # not read without lengths


def launch_fwd(q, k, v, pmap, tmap, inv_norm: float, hstu: bool, split: bool = False, lengths=None, groups: int = 1) -> torch.Tensor:
    """Forward kernel on contiguous (B, H, N, D) q, k, v of one dtype and the bias maps of
    :func:`bias_maps`, ``pmap`` (N, N) and ``tmap`` (B, N, N) or None: out (B, N, C, H, DV).
    ``split``: FuXi-alpha's semantic channel only (the maps are not read). ``lengths`` (B,)
    int or None: each sequence's real positions (padding after them); padding rows and keys
    are skipped and its output rows are zero. ``groups`` G: the H heads are G groups of H/G
    (Fuxi-MME's streams of one sequence), and out is laid out (B, G, N, C, H/G, DV), each
    group's rows whole (G = 1: the layout above)."""
    B, H, N, _ = q.shape
    DV = v.shape[-1]
    out = torch.empty(B, groups, N, _channels(hstu, split), H // groups, DV, device=q.device, dtype=q.dtype)
    bm, bn, opts = _launch("fwd", hstu, split, DV)
    fwd[(triton.cdiv(N, bm), B * H)](
        q,
        k,
        v,
        pmap,
        _tmap_arg(tmap, pmap),
        _len_arg(lengths, q),
        out,
        H,
        groups,
        N,
        q.shape[-1],
        DV,
        inv_norm,
        **_consts(q, v, hstu, tmap is not None, bm, bn, split, lengths is not None),
        **opts,
    )
    return out


def launch_bwd_kv(q, k, v, pmap, tmap, do, inv_norm: float, hstu: bool, split: bool = False, lengths=None, groups: int = 1):
    """dK, dV from the key-block kernel (``do`` contiguous, laid out as the forward's out)."""
    B, H, N, _ = q.shape
    dk, dv = torch.empty_like(k), torch.empty_like(v)
    bm, bn, opts = _launch("bwd_kv", hstu, split, v.shape[-1])
    bwd_kv[(triton.cdiv(N, bn), B * H)](
        q,
        k,
        v,
        pmap,
        _tmap_arg(tmap, pmap),
        _len_arg(lengths, q),
        do,
        dk,
        dv,
        H,
        groups,
        N,
        q.shape[-1],
        v.shape[-1],
        inv_norm,
        **_consts(q, v, hstu, tmap is not None, bm, bn, split, lengths is not None),
        **opts,
    )
    return dk, dv


def launch_bwd_q(q, k, v, pmap, tmap, do, inv_norm: float, hstu: bool, split: bool = False, lengths=None, groups: int = 1):
    """dQ from the query-block kernel, and for HSTU the (B, N, N) fp32 gradient of the bias
    pre-activation summed over heads (an empty tensor for FuXi-alpha)."""
    B, H, N, _ = q.shape
    dq = torch.empty_like(q)
    gp = torch.zeros(B, N, N, device=q.device, dtype=torch.float32) if hstu else q.new_empty(0, dtype=torch.float32)
    bm, bn, opts = _launch("bwd_q", hstu, split, v.shape[-1])
    bwd_q[(triton.cdiv(N, bm), B * H)](
        q,
        k,
        v,
        pmap,
        _tmap_arg(tmap, pmap),
        _len_arg(lengths, q),
        do,
        dq,
        gp if hstu else dq,
        H,
        groups,
        N,
        q.shape[-1],
        v.shape[-1],
        inv_norm,
        **_consts(q, v, hstu, tmap is not None, bm, bn, split, lengths is not None),
        **opts,
    )  # GP unused for FuXi
    return dq, gp


BIAS_GRAD_WIDTH = 64


def bias_launch_kind(dv: int) -> str:
    """The ``LAUNCH`` table of the ``bias_grad`` kernel at head width ``dv``."""
    return "fuxi-bias" + ("-d32" if dv <= 32 else "")


def launch_bias_grad(v, do, buckets, lengths, groups: int, n_pos: int, n_time: int):
    """FuXi-alpha's table gradients straight from ``do`` (laid out as the forward's out) and v:
    (n_pos,) for ``pos_w`` and (n_time,) for ``time_w`` (empty without ``buckets``), fp32,
    from the ``bias_grad`` kernel's rows (one per sequence) summed."""
    B, H, N, DV = v.shape
    bm, bn, warps, stages = LAUNCH[bias_launch_kind(DV)]["bias_grad"]
    bw, opts = BIAS_GRAD_WIDTH, dict(num_warps=warps, num_stages=stages)
    if interpreting():
        bm, bn, bw, opts = 16, 16, 16, {}
    grid = (triton.cdiv(N, bm), B)
    use_time = buckets is not None
    pg = torch.zeros(B, N, device=v.device, dtype=torch.float32)
    tg = torch.zeros(B if use_time else 0, n_time, device=v.device, dtype=torch.float32)
    bias_grad[grid](
        v,
        do,
        buckets if use_time else v,
        lengths if lengths is not None else v,
        pg,
        tg if use_time else pg,
        N,
        n_time,
        H=H,
        G=groups,
        DV=DV,
        USE_TIME=use_time,
        HAS_LEN=lengths is not None,
        IEEE=v.dtype == torch.float32,
        BM=bm,
        BN=bn,
        BW=bw,
        **opts,
    )
    # entries past N - 1 (a table longer than this call's length) get no gradient
    return torch.nn.functional.pad(pg.sum(0), (0, n_pos - N)), tg.sum(0)


def table_grads(v, do, gp, pos_n: int, buckets, time_n: int, hstu: bool, lengths=None, groups: int = 1):
    """Gradients of the bias tables ``pos_w`` (``pos_n`` entries) and ``time_w`` (``time_n``;
    None without ``buckets``), fp32. FuXi-alpha: the ``bias_grad`` kernel, unless deterministic
    algorithms are on (its atomic adds are not ordered); then, and for HSTU, the map gradients
    of :func:`map_grads` folded into the tables by :func:`~fuxi_mme.models.attention.shared.small_table_grad`."""
    N = v.shape[2]
    if not hstu and not torch.are_deterministic_algorithms_enabled():
        d_pos, d_time = launch_bias_grad(v, do, buckets, lengths, groups, pos_n, time_n)
        return d_pos, (d_time if buckets is not None else None)
    dpm, dtm = map_grads(v, do, gp, buckets is not None, hstu, lengths, groups)
    # relative_position_bias's indices (the map gradient is zero above the diagonal)
    d_pos = small_table_grad(relative_positions(N, v.device), dpm, pos_n)
    return d_pos, (small_table_grad(buckets, dtm, time_n) if buckets is not None else None)


def map_grads(v, do, gp, has_time: bool, hstu: bool, lengths=None, groups: int = 1):
    """Gradients of the bias maps: (N, N) positional, (B, N, N) temporal (or None), zero
    above the diagonal. HSTU: ``gp`` from ``launch_bwd_q`` (its two biases share one
    pre-activation). FuXi-alpha: the bias channels do not depend on q or k, so the gradient at
    (b, i, j) is sum_h do_h[i] . v_h[j], one (N, H*DV) x (H*DV, N) product per sequence and
    channel (no atomics), in the inputs' dtype with fp32 accumulation (as the reference's
    matrix products under autocast); padding rows (constant zero outputs) contribute nothing."""
    B, H, N, DV = v.shape
    if hstu:
        return gp.sum(0), (gp if has_time else None)
    do = do.view(B, groups, N, -1, (H // groups) * DV)  # (B, G, N, C, H/G*DV)
    if lengths is not None:
        do = do * row_mask(lengths, N)[:, None, :, None, None].to(do.dtype)
    v_t = v.transpose(1, 2).reshape(B, N, H * DV).transpose(1, 2)  # (B, H*DV, N)
    channel_grad = lambda c: torch.bmm(do[:, :, :, c].transpose(1, 2).reshape(B, N, H * DV), v_t).tril_()  # noqa: E731
    return channel_grad(1).float().sum(0), (channel_grad(2) if has_time else None)


# The kernels as two custom operators: opaque to torch.compile (Inductor compiles the model
# around them instead of tracing into the Triton launches) and recorded as they are by CUDA graphs.
_LIB = "fuxi_mme"
_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor pmap, Tensor? tmap, Tensor? lengths, Tensor pos_w, Tensor time_w, Tensor? buckets, "
    "float inv_norm, bool hstu, bool split, int groups) -> Tensor"
)
_TABLE_SCHEMA = (
    "(Tensor v, Tensor do, Tensor? gp, Tensor? buckets, Tensor? lengths, int pos_n, int time_n, bool hstu, int groups) -> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor pmap, Tensor? tmap, Tensor? lengths, Tensor do, float inv_norm, bool hstu, bool split, int groups) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


@torch.library.custom_op(f"{_LIB}::fused_attention_fwd", mutates_args=(), schema=_FWD_SCHEMA)
def _fwd_op(q, k, v, pmap, tmap, lengths, pos_w, time_w, buckets, inv_norm, hstu, split, groups):
    # pos_w, time_w, buckets: not read here (the maps carry their values); inputs so that the
    # backward can hand the tables their gradients directly
    return launch_fwd(q, k, v, pmap, tmap, inv_norm, hstu, split, lengths, groups)


@_fwd_op.register_fake
def _(q, k, v, pmap, tmap, lengths, pos_w, time_w, buckets, inv_norm, hstu, split, groups):
    B, H, N, _ = q.shape
    return q.new_empty(B, groups, N, _channels(hstu, split), H // groups, v.shape[-1])


@torch.library.custom_op(f"{_LIB}::fused_attention_bwd", mutates_args=(), schema=_BWD_SCHEMA)
def _bwd_op(q, k, v, pmap, tmap, lengths, do, inv_norm, hstu, split, groups):
    dk, dv = launch_bwd_kv(q, k, v, pmap, tmap, do, inv_norm, hstu, split, lengths, groups)
    dq, gp = launch_bwd_q(q, k, v, pmap, tmap, do, inv_norm, hstu, split, lengths, groups)
    return dq, dk, dv, gp


@_bwd_op.register_fake
def _(q, k, v, pmap, tmap, lengths, do, inv_norm, hstu, split, groups):
    B, H, N, _ = q.shape
    gp = q.new_empty(B, N, N, dtype=torch.float32) if hstu else q.new_empty(0, dtype=torch.float32)
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), gp


@torch.library.custom_op(f"{_LIB}::fused_attention_tables", mutates_args=(), schema=_TABLE_SCHEMA)
def _table_op(v, do, gp, buckets, lengths, pos_n, time_n, hstu, groups):
    d_pos, d_time = table_grads(v, do, gp, pos_n, buckets, time_n, hstu, lengths, groups)
    return d_pos, (d_time if d_time is not None else d_pos.new_zeros(0))


@_table_op.register_fake
def _(v, do, gp, buckets, lengths, pos_n, time_n, hstu, groups):
    return v.new_empty(pos_n, dtype=torch.float32), v.new_empty(time_n if buckets is not None else 0, dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, pmap, tmap, lengths, pos_w, time_w, buckets, inv_norm, hstu, split, groups = inputs
    ctx.save_for_backward(q, k, v, pmap, tmap, lengths, buckets)
    ctx.meta = (inv_norm, hstu, split, groups, pos_w.shape[0], time_w.shape[0], pos_w.dtype, time_w.dtype)


def _backward(ctx, grad):
    q, k, v, pmap, tmap, lengths, buckets = ctx.saved_tensors
    inv_norm, hstu, split, groups, pos_n, time_n, pos_dt, time_dt = ctx.meta
    do = grad.to(q.dtype).contiguous()
    dq, dk, dv, gp = _bwd_op(q, k, v, pmap, tmap, lengths, do, inv_norm, hstu, split, groups)
    rest = (None,) * 5  # buckets, inv_norm, hstu, split, groups
    if split:  # the maps and tables were not used (the bias channels are products outside the kernels)
        return dq, dk, dv, None, None, None, None, None, *rest
    d_pos, d_time = _table_op(v, do, gp if hstu else None, buckets if tmap is not None else None, lengths, pos_n, time_n, hstu, groups)
    # pmap, tmap, lengths: none (the maps were built without autograd); the tables: their gradients
    return dq, dk, dv, None, None, None, d_pos.to(pos_dt), (d_time.to(time_dt) if tmap is not None else None), *rest


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def bias_maps(pos_w, time_w, buckets, n: int, dtype: torch.dtype):
    """The positional (N, N) bias map in fp32 and the temporal (B, N, N) one in ``dtype`` (None
    without buckets), built once per call and shared by every head; their gradients go back to
    the tables through :func:`~fuxi_mme.models.attention.shared.lookup`. The positional map is small,
    and in fp32 its gradient (a sum over the batch, then over each diagonal) is not rounded to
    bf16 on the way."""
    pmap = relative_position_bias(pos_w, n).float().contiguous()
    if buckets is None:
        return pmap, None
    if not torch.is_grad_enabled() or not time_w.requires_grad:
        return pmap, time_w.to(dtype)[buckets]  # no autograd: gathered from the cast table, one pass
    return pmap, lookup(time_w, buckets).to(dtype).contiguous()


def _attention(q, k, v, pos_w, time_w, buckets, norm: float, hstu: bool, split: bool = False, lengths=None, groups: int = 1) -> torch.Tensor:
    B, H, N, _ = q.shape
    dt = q.dtype
    # contiguous (B, H, N, D) and bias maps, all of q's dtype
    q, k, v = q.contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous()
    if lengths is not None:
        lengths = lengths.contiguous()
    if not split:
        # the maps are plain inputs of the kernels; their tables get their gradients straight
        # from the operator's backward (``table_grads``), not through the maps
        with torch.no_grad():
            pmap, tmap = bias_maps(pos_w, time_w, buckets, N, dt)
        out = _fwd_op(q, k, v, pmap, tmap, lengths, pos_w, time_w, buckets if tmap is not None else None, 1.0 / float(norm), hstu, False, groups)
        return out.view(B * groups, N, -1)
    pmap, tmap = bias_maps(pos_w, time_w, buckets, N, dt)
    # FuXi-alpha, bias channels outside the kernels: the semantic channel from the kernel (the
    # maps are not read; q stands in for them), then each bias channel as one product per
    # sequence over all heads at once, (N, N) x (N, H*DV), through autograd
    sem = _fwd_op(q, k, v, q.detach(), None, lengths, pos_w.detach(), time_w.detach(), None, 1.0 / float(norm), False, True, groups).view(
        B, groups, N, -1
    )
    v_cat = v.transpose(1, 2).reshape(B, N, -1)  # (B, N, H*DV)
    pos = torch.matmul(pmap.tril().to(dt), v_cat)
    time = torch.bmm(tmap.tril(), v_cat) if tmap is not None else torch.zeros_like(pos)
    bias = torch.cat([pos, time], dim=-1)  # (B, N, 2*H*DV), channel-major
    if lengths is not None:  # padding rows are zero, as the kernel's
        bias = bias * row_mask(lengths, N)[:, :, None].to(dt)
    bias = ungroup(bias, 2, groups).view(B, groups, N, -1)  # each group's heads, channel-major
    return torch.cat([sem, bias], dim=-1).view(B * groups, N, -1)


def fused_fuxi_attention(q, k, v, pos_w, time_w, buckets, norm: float, lengths=None, groups: int = 1, split: bool | None = None) -> torch.Tensor:
    """Same contract as :func:`~fuxi_mme.models.attention.fuxi_attention_reference`. ``split``:
    the bias channels as matrix products outside the kernels (default: ``BIAS_CHANNELS``)."""
    if split is None:
        split = BIAS_CHANNELS == "matmul"
    return _attention(q, k, v, pos_w, time_w, buckets, norm, False, split, lengths, groups)


def fused_hstu_attention(q, k, v, pos_w, time_w, buckets, norm: float, lengths=None, groups: int = 1) -> torch.Tensor:
    """Same contract as :func:`~fuxi_mme.models.attention.hstu_attention_reference`."""
    return _attention(q, k, v, pos_w, time_w, buckets, norm, True, False, lengths, groups)

"""The Triton kernels of the fused attention (``fused.py``: what they compute, the bias maps
they read, and the launches and custom operators around them).

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

Padding: with ``lengths`` (each sequence's real positions, padding after them, as every batch
here is laid out) the kernels skip every tile past a sequence's length (the loops end at it)
and write zeros to its padding rows; attention is causal, so the real rows are unchanged. At
ML-20M about half of all positions are padding, and the causal triangle's tiles past the
length are most of the work.
"""

from __future__ import annotations

from ...utils.triton_support import HAVE_TRITON, interpreting, tl, triton

__all__ = ["HAVE_TRITON", "interpreting", "tl", "triton"]

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

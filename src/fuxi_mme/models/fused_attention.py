"""Fused Triton kernels for FuXi-alpha's three-channel attention and HSTU's attention.

The reference (``attention.py``) materialises (B, H, N, N) attention maps per channel; these
kernels stream key blocks through on-chip memory instead, flash-attention style (no softmax,
so no running maximum is needed: every channel is a plain weighted sum).

FuXi-alpha, per (batch b, head h), causal (j <= i), N = the normaliser (configured max_len)::

    out_sem[i] = sum_j silu(q_i . k_j) / N * v_j
    out_pos[i] = sum_j pos_w[i - j] * v_j
    out_time[i] = sum_j time_w[bucket[b, i, j]] * v_j

HSTU: ``out[i] = sum_j silu(q_i . k_j + pos_w[i - j] + time_w[bucket[b, i, j]]) / N * v_j``.

Backward: one kernel per key block accumulates dK and dV; one per query block accumulates dQ.
The gradient of every (i, j) bias entry, summed over heads, goes into a (B, N, N) fp32 buffer
that ``small_table_grad`` folds into ``pos_w`` / ``time_w``: for HSTU the dQ kernel adds each
head's share atomically; FuXi-alpha's bias channels do not depend on q or k, so their buffers
are one batched product per channel, ``sum_h dout_h @ v_h^T`` (no atomics).

Status: checked against the reference (values and all five gradients, fp32 and bf16) in
Triton's CPU interpreter (``TRITON_INTERPRET=1``) and on an H100 (``tests/test_fused_attention.py``).
``model.attention=fused`` selects it; ``auto`` keeps the reference, which measured faster
inside the whole training step (docs/performance.md).
"""

from __future__ import annotations

import os

import torch

from .attention import small_table_grad

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
    # Layouts (all contiguous): q, k (B*H, N, DQ); v (B*H, N, DV); buckets (B, N, N);
    # out / dout (B, N, C, H, DV) with C = 3 channels (FuXi) or 1 (HSTU).

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
    def _orows(PTR, b, h, c, offs, N, C, H, DV, BDV: tl.constexpr):
        """Pointers and mask of channel ``c``, head ``h``, rows ``offs`` of a (B, N, C, H, DV) tensor."""
        offs_d = tl.arange(0, BDV)
        return PTR + ((b * N + offs[:, None]) * C + c) * H * DV + h * DV + offs_d[None, :], (offs[:, None] < N) & (offs_d[None, :] < DV)

    @triton.jit
    def _load_rows(PTR, bh, offs, N, D, BD: tl.constexpr):
        ptr, mask = _rows(PTR, bh, offs, N, D, BD)
        return tl.load(ptr, mask=mask, other=0.0)

    @triton.jit
    def _tile(Q, K, V, POS, TIME, BKT, b, bh, offs_m, offs_n, q, N, DQ, DV,
              HSTU: tl.constexpr, USE_TIME: tl.constexpr, IEEE: tl.constexpr, BDQ: tl.constexpr, BDV: tl.constexpr):
        """k, v of key rows ``offs_n``; the pre-activation z, the causal mask and the bias maps."""
        k = _load_rows(K, bh, offs_n, N, DQ, BDQ)
        v = _load_rows(V, bh, offs_n, N, DV, BDV)
        s = _dot(q, tl.trans(k), IEEE)
        causal = (offs_m[:, None] >= offs_n[None, :]) & (offs_m[:, None] < N) & (offs_n[None, :] < N)
        p = tl.load(POS + (offs_m[:, None] - offs_n[None, :]), mask=causal, other=0.0)
        if USE_TIME:
            bk = tl.load(BKT + (b * N + offs_m[:, None]) * N + offs_n[None, :], mask=causal, other=0)
            t = tl.load(TIME + bk, mask=causal, other=0.0)
        else:
            t = tl.zeros(p.shape, tl.float32)
        if HSTU:
            z = s + p + t
        else:
            z = s
        return k, v, z, causal, p, t

    @triton.jit
    def fwd(Q, K, V, POS, TIME, BKT, O, H, N, DQ, DV, inv_norm,
            HSTU: tl.constexpr, USE_TIME: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BDQ: tl.constexpr, BDV: tl.constexpr):
        pid_m, bh, b, h, offs_m = _program(H, BM)
        q = _load_rows(Q, bh, offs_m, N, DQ, BDQ)
        acc0 = tl.zeros((BM, BDV), tl.float32)
        acc1 = tl.zeros((BM, BDV), tl.float32)
        acc2 = tl.zeros((BM, BDV), tl.float32)
        for start_n in range(0, tl.minimum((pid_m + 1) * BM, N), BN):
            offs_n = start_n + tl.arange(0, BN)
            k, v, z, causal, p, t = _tile(Q, K, V, POS, TIME, BKT, b, bh, offs_m, offs_n, q, N, DQ, DV, HSTU, USE_TIME, IEEE, BDQ, BDV)
            a = tl.where(causal, z * tl.sigmoid(z) * inv_norm, 0.0)
            acc0 += _dot(a.to(v.dtype), v, IEEE)
            if not HSTU:
                acc1 += _dot(p.to(v.dtype), v, IEEE)
                if USE_TIME:
                    acc2 += _dot(t.to(v.dtype), v, IEEE)
        ptr, mask = _orows(O, b, h, 0, offs_m, N, C, H, DV, BDV)
        tl.store(ptr, acc0.to(O.dtype.element_ty), mask=mask)
        if not HSTU:
            tl.store(ptr + H * DV, acc1.to(O.dtype.element_ty), mask=mask)
            tl.store(ptr + 2 * H * DV, acc2.to(O.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd_kv(Q, K, V, POS, TIME, BKT, DO, DK, DVp, H, N, DQ, DV, inv_norm,
               HSTU: tl.constexpr, USE_TIME: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BDQ: tl.constexpr, BDV: tl.constexpr):
        pid_n, bh, b, h, offs_n = _program(H, BN)
        dk = tl.zeros((BN, BDQ), tl.float32)
        dv = tl.zeros((BN, BDV), tl.float32)
        for start_m in range((pid_n * BN // BM) * BM, N, BM):
            offs_m = start_m + tl.arange(0, BM)
            q = _load_rows(Q, bh, offs_m, N, DQ, BDQ)
            k, v, z, causal, p, t = _tile(Q, K, V, POS, TIME, BKT, b, bh, offs_m, offs_n, q, N, DQ, DV, HSTU, USE_TIME, IEEE, BDQ, BDV)
            ptr, mask = _orows(DO, b, h, 0, offs_m, N, C, H, DV, BDV)
            do0 = tl.load(ptr, mask=mask, other=0.0)
            sig = tl.sigmoid(z)
            a = tl.where(causal, z * sig * inv_norm, 0.0)
            dv += _dot(tl.trans(a).to(do0.dtype), do0, IEEE)
            if not HSTU:
                do1 = tl.load(ptr + H * DV, mask=mask, other=0.0)
                dv += _dot(tl.trans(p).to(do1.dtype), do1, IEEE)
                if USE_TIME:
                    do2 = tl.load(ptr + 2 * H * DV, mask=mask, other=0.0)
                    dv += _dot(tl.trans(t).to(do2.dtype), do2, IEEE)
            dz = tl.where(causal, _dot(do0, tl.trans(v), IEEE) * sig * (1.0 + z * (1.0 - sig)) * inv_norm, 0.0)
            dk += _dot(tl.trans(dz).to(q.dtype), q, IEEE)
        ptr, mask = _rows(DK, bh, offs_n, N, DQ, BDQ)
        tl.store(ptr, dk.to(DK.dtype.element_ty), mask=mask)
        ptr, mask = _rows(DVp, bh, offs_n, N, DV, BDV)
        tl.store(ptr, dv.to(DVp.dtype.element_ty), mask=mask)

    @triton.jit
    def bwd_q(Q, K, V, POS, TIME, BKT, DO, DQp, GP, H, N, DQ, DV, inv_norm,
              HSTU: tl.constexpr, USE_TIME: tl.constexpr, IEEE: tl.constexpr, C: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BDQ: tl.constexpr, BDV: tl.constexpr):
        pid_m, bh, b, h, offs_m = _program(H, BM)
        q = _load_rows(Q, bh, offs_m, N, DQ, BDQ)
        ptr, mask = _orows(DO, b, h, 0, offs_m, N, C, H, DV, BDV)
        do0 = tl.load(ptr, mask=mask, other=0.0)
        dq = tl.zeros((BM, BDQ), tl.float32)
        for start_n in range(0, tl.minimum((pid_m + 1) * BM, N), BN):
            offs_n = start_n + tl.arange(0, BN)
            k, v, z, causal, p, t = _tile(Q, K, V, POS, TIME, BKT, b, bh, offs_m, offs_n, q, N, DQ, DV, HSTU, USE_TIME, IEEE, BDQ, BDV)
            sig = tl.sigmoid(z)
            dz = tl.where(causal, _dot(do0, tl.trans(v), IEEE) * sig * (1.0 + z * (1.0 - sig)) * inv_norm, 0.0)
            dq += _dot(dz.to(k.dtype), k, IEEE)
            if HSTU:  # the bias gradient is dz summed over heads: the (B, N, N) buffer, atomically
                g = (b * N + offs_m[:, None]) * N + offs_n[None, :]
                tl.atomic_add(GP + g, dz, mask=causal)
        ptr, mask = _rows(DQp, bh, offs_m, N, DQ, BDQ)
        tl.store(ptr, dq.to(DQp.dtype.element_ty), mask=mask)


def _kernels():
    """The kernels; TRITON_INTERPRET=1 at import time makes them run in Triton's CPU interpreter."""
    return fwd, bwd_kv, bwd_q


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(int(x)))


class _FusedAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, pos_w, time_w, buckets, norm: float, hstu: bool):
        B, H, N, DQ = q.shape
        DV = v.shape[-1]
        C = 1 if hstu else 3
        interp = interpreting()
        fwd, _, _ = _kernels()
        use_time = buckets is not None
        dt = q.dtype
        # contiguous (B, H, N, D): the gradients below are allocated with the same strides
        q, k, v = q.contiguous(), k.to(dt).contiguous(), v.to(dt).contiguous()
        pos = pos_w.float().contiguous()
        time = time_w.float().contiguous() if use_time else pos
        bk = buckets.contiguous() if use_time else torch.zeros(1, dtype=torch.long, device=q.device)
        out = torch.empty(B, N, C, H, DV, device=q.device, dtype=dt)
        BM = BN = 16 if interp else 64
        ieee = dt == torch.float32
        grid = (triton.cdiv(N, BM), B * H)
        fwd[grid](q, k, v, pos, time, bk, out, H, N, DQ, DV, 1.0 / norm,
                  HSTU=hstu, USE_TIME=use_time, IEEE=ieee, C=C, BM=BM, BN=BN, BDQ=_pow2(DQ), BDV=_pow2(DV))
        ctx.save_for_backward(q, k, v, pos, time, bk)
        ctx.meta = (norm, hstu, use_time, pos_w.dtype, time_w.dtype, BM)
        return out.view(B, N, C * H * DV)

    @staticmethod
    def backward(ctx, grad):
        q, k, v, pos, time, bk = ctx.saved_tensors
        norm, hstu, use_time, pos_dtype, time_dtype, BM = ctx.meta
        B, H, N, DQ = q.shape
        DV = v.shape[-1]
        C = 1 if hstu else 3
        _, bwd_kv, bwd_q = _kernels()
        do = grad.reshape(B, N, C, H, DV).to(q.dtype).contiguous()
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        # HSTU: the kernel adds each head's dz into gp (atomics across heads). FuXi-alpha's bias
        # channels do not depend on q or k: their gradient at (b, i, j) is sum_h do_h[i] . v_h[j],
        # one (N, H*DV) x (H*DV, N) product per sequence and channel, with no atomics
        gp = torch.zeros(B, N, N, device=q.device, dtype=torch.float32) if hstu else None
        ieee = q.dtype == torch.float32
        meta = dict(HSTU=hstu, USE_TIME=use_time, IEEE=ieee, C=C, BM=BM, BN=BM, BDQ=_pow2(DQ), BDV=_pow2(DV))
        grid = (triton.cdiv(N, BM), B * H)
        bwd_kv[grid](q, k, v, pos, time, bk, do, dk, dv, H, N, DQ, DV, 1.0 / norm, **meta)
        bwd_q[grid](q, k, v, pos, time, bk, do, dq, gp if hstu else pos, H, N, DQ, DV, 1.0 / norm, **meta)  # GP unused for FuXi
        if hstu:
            gt = gp  # HSTU's positional and temporal biases share one pre-activation: one gradient
        else:
            v_t = v.float().transpose(1, 2).reshape(B, N, H * DV).transpose(1, 2)  # (B, H*DV, N)
            channel_grad = lambda c: torch.bmm(do[:, :, c].float().reshape(B, N, H * DV), v_t).tril_()  # noqa: E731
            gp = channel_grad(1)
            gt = channel_grad(2) if use_time else None
        # gp / gt are zero above the diagonal, so every entry can be binned (no boolean
        # indexing: that would be a host sync); rel = max(i - j, 0)
        ar = torch.arange(N, device=q.device)
        rel = (ar[:, None] - ar[None, :]).clamp(min=0)
        dpos = small_table_grad(rel, gp.sum(0), pos.shape[0])
        dtime = None
        if use_time:
            dtime = small_table_grad(bk, gt, time.shape[0]).to(time_dtype)
        return dq, dk, dv, dpos.to(pos_dtype), dtime, None, None, None


def fused_fuxi_attention(q, k, v, pos_w, time_w, buckets, norm: float) -> torch.Tensor:
    """Same contract as :func:`~fuxi_mme.models.attention.fuxi_attention_reference`."""
    return _FusedAttention.apply(q, k, v, pos_w, time_w, buckets, float(norm), False)


def fused_hstu_attention(q, k, v, pos_w, time_w, buckets, norm: float) -> torch.Tensor:
    """Same contract as :func:`~fuxi_mme.models.attention.hstu_attention_reference`."""
    return _FusedAttention.apply(q, k, v, pos_w, time_w, buckets, float(norm), True)

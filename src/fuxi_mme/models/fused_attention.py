"""Fused Triton kernels for FuXi-alpha's three-channel attention and HSTU's attention.

The reference (``attention.py``) materialises (B, H, N, N) attention maps per channel; these
kernels stream key blocks through on-chip memory instead, flash-attention style (no softmax,
so no running maximum is needed: every channel is a plain weighted sum).

FuXi-alpha, per (batch b, head h), causal (j <= i), N = the normaliser (configured max_len)::

    out_sem[i] = sum_j silu(q_i . k_j) / N * v_j
    out_pos[i] = sum_j pos_w[i - j] * v_j
    out_time[i] = sum_j time_w[bucket[b, i, j]] * v_j

HSTU: ``out[i] = sum_j silu(q_i . k_j + pos_w[i - j] + time_w[bucket[b, i, j]]) / N * v_j``.

Backward: one kernel per key block accumulates dK and dV; one per query block accumulates dQ
and writes the gradient of every (i, j) bias entry, summed over heads, into a (B, N, N) fp32
buffer (atomic adds across heads), which ``index_add_`` folds into ``pos_w`` / ``time_w``.

Status: checked against the reference (values and all five gradients, fp32) in Triton's CPU
interpreter (``TRITON_INTERPRET=1``), see ``tests/test_fused_attention.py``; the same tests run
on a GPU when one is present. ``model.attention=fused`` selects it; ``auto`` keeps the
reference until the GPU parity and speed runs are recorded (docs/performance.md).
"""

from __future__ import annotations

import os

import torch

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
    @triton.jit
    def _dot(a, b, IEEE: tl.constexpr):
        if IEEE:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _biases(POS, TIME, BKT, b, offs_m, offs_n, causal, sbb, sbm, USE_TIME: tl.constexpr):
        rel = offs_m[:, None] - offs_n[None, :]
        p = tl.load(POS + rel, mask=causal, other=0.0)
        if USE_TIME:
            bk = tl.load(BKT + b * sbb + offs_m[:, None] * sbm + offs_n[None, :], mask=causal, other=0)
            t = tl.load(TIME + bk, mask=causal, other=0.0)
        else:
            t = tl.zeros(p.shape, tl.float32)
        return p, t

    @triton.jit
    def fwd(Q, K, V, POS, TIME, BKT, O,
            sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbm, sob, son, soc, soh,
            H, N, DQ, DV, inv_norm,
            HSTU: tl.constexpr, USE_TIME: tl.constexpr, IEEE: tl.constexpr,
            BM: tl.constexpr, BN: tl.constexpr, BDQ: tl.constexpr, BDV: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_q = tl.arange(0, BDQ)
        offs_v = tl.arange(0, BDV)
        m_ok = offs_m < N
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_q[None, :], mask=m_ok[:, None] & (offs_q[None, :] < DQ), other=0.0)
        acc0 = tl.zeros((BM, BDV), tl.float32)
        acc1 = tl.zeros((BM, BDV), tl.float32)
        acc2 = tl.zeros((BM, BDV), tl.float32)
        hi = tl.minimum((pid_m + 1) * BM, N)
        for start_n in range(0, hi, BN):
            offs_n = start_n + tl.arange(0, BN)
            n_ok = offs_n < N
            k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_q[None, :], mask=n_ok[:, None] & (offs_q[None, :] < DQ), other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_v[None, :], mask=n_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
            s = _dot(q, tl.trans(k), IEEE)
            causal = (offs_m[:, None] >= offs_n[None, :]) & m_ok[:, None] & n_ok[None, :]
            p, t = _biases(POS, TIME, BKT, b, offs_m, offs_n, causal, sbb, sbm, USE_TIME)
            if HSTU:
                z = s + p + t
                a = tl.where(causal, z * tl.sigmoid(z) * inv_norm, 0.0)
                acc0 += _dot(a.to(v.dtype), v, IEEE)
            else:
                a = tl.where(causal, s * tl.sigmoid(s) * inv_norm, 0.0)
                acc0 += _dot(a.to(v.dtype), v, IEEE)
                acc1 += _dot(p.to(v.dtype), v, IEEE)
                if USE_TIME:
                    acc2 += _dot(t.to(v.dtype), v, IEEE)
        o_ptr = O + b * sob + h * soh + offs_m[:, None] * son + offs_v[None, :]
        o_mask = m_ok[:, None] & (offs_v[None, :] < DV)
        tl.store(o_ptr, acc0.to(O.dtype.element_ty), mask=o_mask)
        if not HSTU:
            tl.store(o_ptr + soc, acc1.to(O.dtype.element_ty), mask=o_mask)
            tl.store(o_ptr + 2 * soc, acc2.to(O.dtype.element_ty), mask=o_mask)

    @triton.jit
    def bwd_kv(Q, K, V, POS, TIME, BKT, DO, DK, DVp,
               sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbm, sob, son, soc, soh,
               H, N, DQ, DV, inv_norm,
               HSTU: tl.constexpr, USE_TIME: tl.constexpr, IEEE: tl.constexpr,
               BM: tl.constexpr, BN: tl.constexpr, BDQ: tl.constexpr, BDV: tl.constexpr):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_n = pid_n * BN + tl.arange(0, BN)
        offs_q = tl.arange(0, BDQ)
        offs_v = tl.arange(0, BDV)
        n_ok = offs_n < N
        kmask = n_ok[:, None] & (offs_q[None, :] < DQ)
        vmask = n_ok[:, None] & (offs_v[None, :] < DV)
        k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_q[None, :], mask=kmask, other=0.0)
        v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_v[None, :], mask=vmask, other=0.0)
        dk = tl.zeros((BN, BDQ), tl.float32)
        dv = tl.zeros((BN, BDV), tl.float32)
        lo = (pid_n * BN // BM) * BM
        for start_m in range(lo, N, BM):
            offs_m = start_m + tl.arange(0, BM)
            m_ok = offs_m < N
            q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_q[None, :], mask=m_ok[:, None] & (offs_q[None, :] < DQ), other=0.0)
            do_ptr = DO + b * sob + h * soh + offs_m[:, None] * son + offs_v[None, :]
            do_mask = m_ok[:, None] & (offs_v[None, :] < DV)
            do0 = tl.load(do_ptr, mask=do_mask, other=0.0)
            s = _dot(q, tl.trans(k), IEEE)
            causal = (offs_m[:, None] >= offs_n[None, :]) & m_ok[:, None] & n_ok[None, :]
            p, t = _biases(POS, TIME, BKT, b, offs_m, offs_n, causal, sbb, sbm, USE_TIME)
            if HSTU:
                z = s + p + t
            else:
                z = s
            sig = tl.sigmoid(z)
            a = tl.where(causal, z * sig * inv_norm, 0.0)
            dv += _dot(tl.trans(a).to(do0.dtype), do0, IEEE)
            if not HSTU:
                do1 = tl.load(do_ptr + soc, mask=do_mask, other=0.0)
                dv += _dot(tl.trans(p).to(do1.dtype), do1, IEEE)
                if USE_TIME:
                    do2 = tl.load(do_ptr + 2 * soc, mask=do_mask, other=0.0)
                    dv += _dot(tl.trans(t).to(do2.dtype), do2, IEEE)
            da = _dot(do0, tl.trans(v), IEEE)
            dz = tl.where(causal, da * sig * (1.0 + z * (1.0 - sig)) * inv_norm, 0.0)
            dk += _dot(tl.trans(dz).to(q.dtype), q, IEEE)
        tl.store(DK + b * skb + h * skh + offs_n[:, None] * skn + offs_q[None, :], dk.to(DK.dtype.element_ty), mask=kmask)
        tl.store(DVp + b * svb + h * svh + offs_n[:, None] * svn + offs_v[None, :], dv.to(DVp.dtype.element_ty), mask=vmask)

    @triton.jit
    def bwd_q(Q, K, V, POS, TIME, BKT, DO, DQp, GP, GT,
              sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sbb, sbm, sob, son, soc, soh, sgb, sgm,
              H, N, DQ, DV, inv_norm,
              HSTU: tl.constexpr, USE_TIME: tl.constexpr, IEEE: tl.constexpr,
              BM: tl.constexpr, BN: tl.constexpr, BDQ: tl.constexpr, BDV: tl.constexpr):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BM + tl.arange(0, BM)
        offs_q = tl.arange(0, BDQ)
        offs_v = tl.arange(0, BDV)
        m_ok = offs_m < N
        qmask = m_ok[:, None] & (offs_q[None, :] < DQ)
        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_q[None, :], mask=qmask, other=0.0)
        do_ptr = DO + b * sob + h * soh + offs_m[:, None] * son + offs_v[None, :]
        do_mask = m_ok[:, None] & (offs_v[None, :] < DV)
        do0 = tl.load(do_ptr, mask=do_mask, other=0.0)
        if not HSTU:
            do1 = tl.load(do_ptr + soc, mask=do_mask, other=0.0)
            do2 = tl.load(do_ptr + 2 * soc, mask=do_mask, other=0.0)
        dq = tl.zeros((BM, BDQ), tl.float32)
        hi = tl.minimum((pid_m + 1) * BM, N)
        for start_n in range(0, hi, BN):
            offs_n = start_n + tl.arange(0, BN)
            n_ok = offs_n < N
            k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_q[None, :], mask=n_ok[:, None] & (offs_q[None, :] < DQ), other=0.0)
            v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_v[None, :], mask=n_ok[:, None] & (offs_v[None, :] < DV), other=0.0)
            s = _dot(q, tl.trans(k), IEEE)
            causal = (offs_m[:, None] >= offs_n[None, :]) & m_ok[:, None] & n_ok[None, :]
            p, t = _biases(POS, TIME, BKT, b, offs_m, offs_n, causal, sbb, sbm, USE_TIME)
            if HSTU:
                z = s + p + t
            else:
                z = s
            sig = tl.sigmoid(z)
            da = _dot(do0, tl.trans(v), IEEE)
            dz = tl.where(causal, da * sig * (1.0 + z * (1.0 - sig)) * inv_norm, 0.0)
            dq += _dot(dz.to(k.dtype), k, IEEE)
            g_ptr = b * sgb + offs_m[:, None] * sgm + offs_n[None, :]
            if HSTU:
                tl.atomic_add(GP + g_ptr, dz, mask=causal)
            else:
                gp = _dot(do1, tl.trans(v), IEEE)
                tl.atomic_add(GP + g_ptr, gp, mask=causal)
                if USE_TIME:
                    gt = _dot(do2, tl.trans(v), IEEE)
                    tl.atomic_add(GT + g_ptr, gt, mask=causal)
        tl.store(DQp + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_q[None, :], dq.to(DQp.dtype.element_ty), mask=qmask)



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
        bk = buckets.contiguous() if use_time else torch.zeros(1, 1, 1, dtype=torch.long, device=q.device)
        out = torch.empty(B, N, C, H, DV, device=q.device, dtype=dt)
        BM = BN = 16 if interp else 64
        ieee = dt == torch.float32
        grid = (triton.cdiv(N, BM), B * H)
        fwd[grid](q, k, v, pos, time, bk, out,
                  *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], bk.stride(0), bk.stride(1),
                  out.stride(0), out.stride(1), out.stride(2), out.stride(3),
                  H, N, DQ, DV, 1.0 / norm,
                  HSTU=hstu, USE_TIME=use_time, IEEE=ieee, BM=BM, BN=BN, BDQ=_pow2(DQ), BDV=_pow2(DV))
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
        gp = torch.zeros(B, N, N, device=q.device, dtype=torch.float32)
        gt = torch.zeros(B, N, N, device=q.device, dtype=torch.float32) if (use_time and not hstu) else gp
        ieee = q.dtype == torch.float32
        common = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], bk.stride(0), bk.stride(1),
                  do.stride(0), do.stride(1), do.stride(2), do.stride(3))
        meta = dict(HSTU=hstu, USE_TIME=use_time, IEEE=ieee, BM=BM, BN=BM, BDQ=_pow2(DQ), BDV=_pow2(DV))
        bwd_kv[(triton.cdiv(N, BM), B * H)](q, k, v, pos, time, bk, do, dk, dv, *common, H, N, DQ, DV, 1.0 / norm, **meta)
        bwd_q[(triton.cdiv(N, BM), B * H)](q, k, v, pos, time, bk, do, dq, gp, gt, *common, gp.stride(0), gp.stride(1), H, N, DQ, DV, 1.0 / norm, **meta)
        causal = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        ar = torch.arange(N, device=q.device)
        rel = (ar[:, None] - ar[None, :])[causal]
        dpos = torch.zeros(pos.shape[0], device=q.device, dtype=torch.float32)
        dpos.index_add_(0, rel, gp.sum(0)[causal])
        dtime = None
        if use_time:
            dtime = torch.zeros(time.shape[0], device=q.device, dtype=torch.float32)
            dtime.index_add_(0, bk[:, causal].reshape(-1), gt[:, causal].reshape(-1))
            dtime = dtime.to(time_dtype)
        return dq, dk, dv, dpos.to(pos_dtype), dtime, None, None, None


def fused_fuxi_attention(q, k, v, pos_w, time_w, buckets, norm: float) -> torch.Tensor:
    """Same contract as :func:`~fuxi_mme.models.attention.fuxi_attention_reference`."""
    return _FusedAttention.apply(q, k, v, pos_w, time_w, buckets, float(norm), False)


def fused_hstu_attention(q, k, v, pos_w, time_w, buckets, norm: float) -> torch.Tensor:
    """Same contract as :func:`~fuxi_mme.models.attention.hstu_attention_reference`."""
    return _FusedAttention.apply(q, k, v, pos_w, time_w, buckets, float(norm), True)

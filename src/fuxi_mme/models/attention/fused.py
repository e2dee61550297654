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

The kernels (``kernels.py``) and how they handle the backward pass and padding are described there.

Optional split (``BIAS_CHANNELS = "matmul"``, FuXi-alpha only): the positional and temporal
channels are plain products of a bias map with v, so they can leave the kernels and run as
one (N, N) x (N, H*DV) product per sequence over all heads at once (cuBLAS, autograd for the
gradients); the kernels then compute the semantic channel alone (two products per tile
instead of four forward, three instead of five in the dK/dV kernel). Aimed at narrow heads
(Fuxi-MME's 8 of width 32 at ML-20M). Measured on an H200 at ML-20M: the kernels get faster
but the products outside cost more than they save (attention alone 0.770 against 0.590 ms for
Fuxi-MME's shape; whole training epochs level within run-to-run spread), so the default stays
"kernel" (docs/performance.md).

Status: checked against the reference (values and all five gradients, fp32 and bf16) in
Triton's CPU interpreter (``TRITON_INTERPRET=1``) and on an H200 (``tests/test_fused_attention.py``).
``model.attention=fused`` selects it; ``auto`` keeps the reference, which is level with it or
faster inside the compiled training step at the ML-1M shape (docs/performance.md).
"""

from __future__ import annotations

import torch

from .kernels import HAVE_TRITON, interpreting, triton
from .shared import lookup, relative_position_bias, relative_positions, row_mask, small_table_grad, ungroup

if HAVE_TRITON:
    from .kernels import bias_grad, bwd_kv, bwd_q, fwd


def fused_available(device: torch.device) -> bool:
    return HAVE_TRITON and (device.type == "cuda" or interpreting())


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

"""The selective scan of the state-space mixer (docs/models.md#state-space-encoder): a plain
sequential reference, a chunked parallel scan in PyTorch, and mamba-ssm's CUDA kernel when that
package is installed (never required).

Legend: B batch, N positions, C chunks, L positions per chunk, Di inner width, S state size.

Every path computes, for each channel i and state s (h starts at zero),

    h_t = exp(dt_t A) * h_{t-1} + dt_t * B_t * u_t,      y_t = C_t . h_t + D * u_t

with u, dt (B, N, Di), A (Di, S) negative, B and C (B, N, S), D (Di); the decays in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

try:  # optional extra: the fused CUDA kernel of the Mamba authors
    from mamba_ssm.ops.selective_scan_interface import selective_scan_fn as _mamba_scan  # type: ignore[import-not-found]
except ImportError:  # the usual case: the PyTorch scans below are used
    _mamba_scan = None

SCANS = ("auto", "reference", "chunked", "kernel")


def kernel_available() -> bool:
    return _mamba_scan is not None


def _compute_dtype(u: torch.Tensor) -> torch.dtype:
    """fp32, or fp64 for fp64 inputs (the tests' exact comparisons)."""
    return torch.promote_types(u.dtype, torch.float32)


def selective_scan_reference(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """The recurrence one position at a time (the definition; slow). Returns y (B, N, Di) in u's dtype."""
    Bsz, N, Di = u.shape
    ct = _compute_dtype(u)
    uf, dtf, A, Bf, Cf = (t.to(ct) for t in (u, dt, A, B, C))
    h = u.new_zeros(Bsz, Di, A.shape[1], dtype=ct)
    ys = []
    for t in range(N):
        dt_t = dtf[:, t, :, None]  # (B, Di, 1)
        h = torch.exp(dt_t * A) * h + dt_t * uf[:, t, :, None] * Bf[:, t, None, :]
        ys.append((h * Cf[:, t, None, :]).sum(-1))
    y = torch.stack(ys, dim=1) + uf * D.to(ct)
    return y.to(u.dtype)


def _shift(x: torch.Tensor, k: int, fill: float) -> torch.Tensor:
    """``x`` moved k places later along dim 1, the first k filled with ``fill`` (shape kept;
    valid for any length, k beyond it included, so traced programs need no guard on the length)."""
    n = x.shape[1]
    pad = [0, 0] * (x.dim() - 2) + [k, 0]
    return F.pad(x, pad, value=fill)[:, :n]


def linear_scan(a: torch.Tensor, b: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive scan of h_t = a_t h_{t-1} + b_t along dim 1 by recursive doubling (Hillis-Steele):
    after level j, b_t holds the sum over the last 2^j inputs and a_t their decay product.
    ``levels`` >= log2 of the length. Returns (prod of a up to t, h_t). Only products of decays
    in (0, 1] are formed, so no exponent can overflow whatever the step sizes."""
    for j in range(levels):
        k = 1 << j
        b = b + a * _shift(b, k, 0.0)
        a = a * _shift(a, k, 1.0)
    return a, b


def _chunked_states(a: torch.Tensor, b: torch.Tensor, L: int, max_chunks: int) -> torch.Tensor:
    """All states h_t = a_t h_{t-1} + b_t (h_0 = 0) of (B, C * L, Di, S) inputs: a doubling scan
    inside every chunk of L positions from a zero state, the chunk-end states carried across
    chunks by a second doubling scan (over at most ``max_chunks``), and each position's decay
    from its chunk start times the state entering its chunk added."""
    Bsz, n, Di, S = a.shape
    nc = n // L
    decay, h = linear_scan(a.reshape(Bsz * nc, L, Di, S), b.reshape(Bsz * nc, L, Di, S), (L - 1).bit_length())
    decay, h = decay.view(Bsz, nc, L, Di, S), h.view(Bsz, nc, L, Di, S)
    _, carry = linear_scan(decay[:, :, -1], h[:, :, -1], (max_chunks - 1).bit_length())
    entering = _shift(carry, 1, 0.0)  # (B, C, Di, S): the state before each chunk's first position
    return (h + decay * entering[:, :, None]).view(Bsz, n, Di, S)


def _padded(u: torch.Tensor, dt: torch.Tensor, B: torch.Tensor, C: torch.Tensor, L: int, max_len: int | None) -> tuple[list[torch.Tensor], int]:
    """u, dt, B, C in the compute dtype, padded at the end (dt = 0 there: decay 1, no input) to a
    multiple of L, or, for a symbolic N (torch.export), to a fixed (max_len // L + 1) * L (never
    a zero pad, which the exporter would have to guard on); and the most chunks there can be."""
    N = u.shape[1]
    symbolic = isinstance(N, torch.SymInt) and max_len is not None
    pad = (max_len // L + 1) * L - N if symbolic and max_len is not None else (-N) % L
    ct = _compute_dtype(u)
    out = [F.pad(t.to(ct), (0, 0, 0, pad)) for t in (u, dt, B, C)]
    max_chunks = max_len // L + 1 if symbolic else out[0].shape[1] // L  # type: ignore[operator]
    return out, max_chunks


def _chunked_forward(u, dt, A, B, C, D, L: int, max_len: int | None) -> torch.Tensor:
    """y (B, N, Di) of the chunked scan, in u's dtype."""
    N = u.shape[1]
    (uf, dtf, Bf, Cf), max_chunks = _padded(u, dt, B, C, L, max_len)
    Af = A.to(uf.dtype)
    h = _chunked_states(torch.exp(dtf[..., None] * Af), (dtf * uf)[..., None] * Bf[:, :, None, :], L, max_chunks)
    y = torch.einsum("bnds,bns->bnd", h, Cf)[:, :N]
    return (y + uf[:, :N] * D.to(uf.dtype)).to(u.dtype)


def _chunked_backward(u, dt, A, B, C, D, dy, L: int, max_len: int | None) -> tuple[torch.Tensor, ...]:
    """Gradients of the chunked scan (du, ddt, dA, dB, dC, dD) in the compute dtype: the states
    recomputed, then the reverse recurrence g_t = a_{t+1} g_{t+1} + C_t dy_t (g = dL/dh_t) by the
    same chunked scan on the flipped sequence; every gradient is a contraction of g, the state
    entering each position and the inputs."""
    N = u.shape[1]
    (uf, dtf, Bf, Cf), max_chunks = _padded(u, dt, B, C, L, max_len)
    ct, n = uf.dtype, uf.shape[1]
    dyf = F.pad(dy.to(ct), (0, 0, 0, n - N))
    Af, Df = A.to(ct), D.to(ct)
    a = torch.exp(dtf[..., None] * Af)  # (B, N', Di, S)
    h = _chunked_states(a, (dtf * uf)[..., None] * Bf[:, :, None, :], L, max_chunks)
    dC = torch.einsum("bnds,bnd->bns", h, dyf)
    h_prev = _shift(h, 1, 0.0)  # the state entering each position
    del h
    a_next = F.pad(a[:, 1:], (0, 0, 0, 0, 0, 1))
    g = _chunked_states(a_next.flip(1), (dyf[..., None] * Cf[:, :, None, :]).flip(1), L, max_chunks).flip(1)
    del a_next
    q = g * h_prev * a  # dL/d(decay_t) * decay_t
    del h_prev, a
    gB = torch.einsum("bnds,bns->bnd", g, Bf)
    du = dtf * gB + Df * dyf
    ddt = torch.einsum("bnds,ds->bnd", q, Af) + uf * gB
    dA = torch.einsum("bnds,bnd->ds", q, dtf)
    dB = torch.einsum("bnds,bnd->bns", g, dtf * uf)
    return du[:, :N], ddt[:, :N], dA, dB[:, :N], dC[:, :N], (dyf * uf).sum((0, 1))


ROWS_ELEMENTS = 1 << 25  # eager runs: at most this many (B, N, Di, S) elements per slice of rows


def _row_slices(u: torch.Tensor, S: int, L: int) -> list[slice]:
    """Slices of the batch rows whose (rows, N, Di, S) tensors stay under ROWS_ELEMENTS (one
    slice when traced: the exported or compiled program keeps no loop over a batch size)."""
    Bsz, N, Di = u.shape
    if torch.compiler.is_compiling() or isinstance(Bsz, torch.SymInt) or isinstance(N, torch.SymInt):
        return [slice(None)]
    rows = max(1, ROWS_ELEMENTS // max(1, (N + L - 1) // L * L * Di * S))
    return [slice(i, i + rows) for i in range(0, Bsz, rows)]


class _ChunkedScan(torch.autograd.Function):
    """The chunked scan with its own backward: only the inputs are kept for backward, which
    recomputes the states (:func:`_chunked_backward`). The (B, N, Di, S) tensors exist only
    while one mixer's forward or backward runs, one slice of rows at a time, instead of several
    per doubling level held from forward to backward (docs/models.md#scans)."""

    @staticmethod
    def forward(ctx, u, dt, A, B, C, D, chunk: int, max_len: int | None):
        ctx.save_for_backward(u, dt, A, B, C, D)
        ctx.chunk, ctx.max_len = chunk, max_len
        parts = _row_slices(u, A.shape[1], chunk)
        with torch.autocast(u.device.type, enabled=False):  # the decays and states stay in fp32
            if len(parts) == 1:
                return _chunked_forward(u, dt, A, B, C, D, chunk, max_len)
            return torch.cat([_chunked_forward(u[r], dt[r], A, B[r], C[r], D, chunk, max_len) for r in parts])

    @staticmethod
    def backward(ctx, dy):
        u, dt, A, B, C, D = ctx.saved_tensors
        with torch.autocast(u.device.type, enabled=False):
            parts = [_chunked_backward(u[r], dt[r], A, B[r], C[r], D, dy[r], ctx.chunk, ctx.max_len) for r in _row_slices(u, A.shape[1], ctx.chunk)]
        du, ddt, dA, dB, dC, dD = (torch.cat(g) if k in (0, 1, 3, 4) else sum(g[1:], g[0]) for k, g in enumerate(zip(*parts)))
        return *(g.to(t.dtype) for g, t in zip((du, ddt, dA, dB, dC, dD), (u, dt, A, B, C, D))), None, None


def selective_scan_chunked(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, chunk: int = 64, max_len: int | None = None
) -> torch.Tensor:
    """The same y as :func:`selective_scan_reference`, in parallel: the sequence is cut into
    chunks of ``chunk`` positions; inside every chunk (all at once) the states are a doubling
    scan from zero; the chunk-end states are carried across chunks by a second doubling scan
    over the chunks; each position then adds its decay from the chunk start times the state
    entering its chunk. ``max_len`` bounds a symbolic N (torch.export with a dynamic length): the
    sequence is then padded to a fixed number of chunks, so no level count depends on N.
    Backward keeps only the inputs and recomputes (:class:`_ChunkedScan`)."""
    return _ChunkedScan.apply(u, dt, A, B, C, D, chunk, max_len)


def selective_scan_kernel(u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor) -> torch.Tensor:
    """mamba-ssm's fused CUDA selective scan (channels-first layout), same arguments and result."""
    assert _mamba_scan is not None, "mamba-ssm is not installed"
    y = _mamba_scan(
        u.transpose(1, 2).contiguous(),
        dt.transpose(1, 2).contiguous(),
        A.contiguous(),
        B.transpose(1, 2).contiguous(),
        C.transpose(1, 2).contiguous(),
        D.float().contiguous(),
    )
    return y.transpose(1, 2)


def resolve_scan(how: str, device: torch.device | str, traced: bool = False) -> str:
    """The scan that ``model.ssm_scan=how`` runs on ``device`` (see :func:`selective_scan`)."""
    if how != "auto":
        return how
    cuda = torch.device(device).type == "cuda"
    return "kernel" if cuda and _mamba_scan is not None and not traced else "chunked" if cuda or traced else "reference"


def selective_scan(
    u: torch.Tensor,
    dt: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor,
    how: str = "auto",
    chunk: int = 64,
    max_len: int | None = None,
) -> torch.Tensor:
    """Dispatch on ``how`` (``model.ssm_scan``). ``auto``: mamba-ssm's kernel on CUDA when it is
    installed, else the chunked scan on CUDA and whenever the code is traced (torch.compile,
    torch.export: its level counts do not depend on the length); the sequential reference in
    eager CPU runs, where its small per-step tensors stay in cache and it is several times
    faster than the chunked scan (docs/models.md#state-space-encoder)."""
    how = resolve_scan(how, u.device, torch.compiler.is_compiling())
    if how == "kernel":
        if _mamba_scan is None:
            raise RuntimeError("model.ssm_scan=kernel needs the mamba-ssm package (pip install mamba-ssm); use auto or chunked")
        return selective_scan_kernel(u, dt, A, B, C, D)
    if how == "reference":
        return selective_scan_reference(u, dt, A, B, C, D)
    return selective_scan_chunked(u, dt, A, B, C, D, chunk=chunk, max_len=max_len)

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


def selective_scan_chunked(
    u: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor, D: torch.Tensor, chunk: int = 64, max_len: int | None = None
) -> torch.Tensor:
    """The same y as :func:`selective_scan_reference`, in parallel: the sequence is cut into
    chunks of ``chunk`` positions; inside every chunk (all at once) the states are a doubling
    scan from zero; the chunk-end states are carried across chunks by a second doubling scan
    over the chunks; each position then adds its decay from the chunk start times the state
    entering its chunk. ``max_len`` bounds a symbolic N (torch.export with a dynamic length): the
    sequence is then padded to a fixed number of chunks, so no level count depends on N."""
    Bsz, N, Di = u.shape
    S = A.shape[1]
    L = chunk
    # padding at the end (dt = 0 there: decay 1, no input), after every real position: to a
    # multiple of L, or, for a symbolic N (torch.export), to a fixed (max_len // L + 1) * L
    # (never a zero pad, which the exporter would have to guard on)
    symbolic = isinstance(N, torch.SymInt) and max_len is not None
    pad = (max_len // L + 1) * L - N if symbolic and max_len is not None else (-N) % L
    ct = _compute_dtype(u)
    uf, dtf, Bf, Cf = (F.pad(t.to(ct), (0, 0, 0, pad)) for t in (u, dt, B, C))
    A = A.to(ct)
    nc = uf.shape[1] // L
    a = torch.exp(dtf[..., None] * A)  # (B, N', Di, S)
    b = (dtf * uf)[..., None] * Bf[:, :, None, :]
    a = a.view(Bsz * nc, L, Di, S)
    b = b.view(Bsz * nc, L, Di, S)
    decay_CL, h_CL = linear_scan(a, b, (L - 1).bit_length())  # from a zero state at each chunk start
    decay_BCL = decay_CL.view(Bsz, nc, L, Di, S)
    h_BCL = h_CL.view(Bsz, nc, L, Di, S)
    max_chunks = max_len // L + 1 if symbolic else nc  # type: ignore[operator]
    _, carry_BC = linear_scan(decay_BCL[:, :, -1], h_BCL[:, :, -1], (max_chunks - 1).bit_length())
    entering = _shift(carry_BC, 1, 0.0)  # (B, C, Di, S): the state before each chunk's first position
    h = h_BCL + decay_BCL * entering[:, :, None]
    y = torch.einsum("bclds,bcls->bcld", h, Cf.view(Bsz, nc, L, S)).reshape(Bsz, nc * L, Di)[:, :N]
    return (y + uf[:, :N] * D.to(ct)).to(u.dtype)


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
    traced = torch.compiler.is_compiling()
    if how == "auto":
        how = "kernel" if u.is_cuda and _mamba_scan is not None and not traced else "chunked" if u.is_cuda or traced else "reference"
    if how == "kernel":
        if _mamba_scan is None:
            raise RuntimeError("model.ssm_scan=kernel needs the mamba-ssm package (pip install mamba-ssm); use auto or chunked")
        return selective_scan_kernel(u, dt, A, B, C, D)
    if how == "reference":
        return selective_scan_reference(u, dt, A, B, C, D)
    return selective_scan_chunked(u, dt, A, B, C, D, chunk=chunk, max_len=max_len)

"""Triton, where it is installed (an optional dependency): the fused attention's and the fused
ranking's kernels are defined only when ``HAVE_TRITON``; ``interpreting()`` is true under
Triton's CPU interpreter (``TRITON_INTERPRET=1``, how the tests run them without a GPU)."""

from __future__ import annotations

from .runtime import interpreting

try:
    import triton
    import triton.language as tl

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is optional
    triton = None
    tl = None
    HAVE_TRITON = False


__all__ = ["HAVE_TRITON", "interpreting", "tl", "triton"]

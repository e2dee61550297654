"""Triton, where it is installed (an optional dependency): the fused attention's and the fused
ranking's kernels are defined only when ``HAVE_TRITON``; ``interpreting()`` is true under
Triton's CPU interpreter (``TRITON_INTERPRET=1``, how the tests run them without a GPU)."""

from __future__ import annotations

import os

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


__all__ = ["HAVE_TRITON", "interpreting", "tl", "triton"]

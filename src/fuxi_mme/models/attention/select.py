"""``model.attention`` -> the attention function a model calls: the PyTorch reference or the
fused Triton kernels (imported only when asked for)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .reference import fuxi_attention_reference, hstu_attention_reference


def select_attention(mode: str, kind: str) -> Callable[..., torch.Tensor]:
    """The attention function for ``model.attention`` (``kind``: "fuxi" or "hstu").

    ``reference`` and ``auto`` use the PyTorch reference; ``fused`` the Triton kernels
    (``fused.py``, needs triton and a CUDA device, or Triton's CPU interpreter with
    ``TRITON_INTERPRET=1``). The kernels pass their GPU parity tests and use a third of the
    reference's memory. Inside the compiled bf16 training step on an H200 they are the fastest
    path at the ML-20M base shape (+5% per epoch) but mixed at ML-1M (docs/performance.md), so
    ``auto`` keeps the reference.
    """
    ref = fuxi_attention_reference if kind == "fuxi" else hstu_attention_reference
    if mode in ("reference", "auto"):
        return ref
    from . import fused as fa  # imported on demand: it defines the Triton kernels

    if not fa.HAVE_TRITON:
        raise RuntimeError("model.attention=fused needs triton (pip install triton) and a CUDA GPU; use model.attention=reference")
    fused = fa.fused_fuxi_attention if kind == "fuxi" else fa.fused_hstu_attention

    def attend(q, k, v, pos_w, time_w, buckets, norm, lengths=None, groups=1):
        if torch.compiler.is_exporting():  # Triton kernels are not exportable: the program holds the reference
            return ref(q, k, v, pos_w, time_w, buckets, norm, lengths, groups)
        if not fa.fused_available(q.device):
            raise RuntimeError(f"model.attention=fused runs on CUDA tensors (got {q.device}); use model.attention=reference on CPU")
        return fused(q, k, v, pos_w, time_w, buckets, norm, lengths, groups)

    return attend

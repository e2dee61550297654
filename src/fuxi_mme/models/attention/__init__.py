"""FuXi-alpha's and HSTU's pointwise attention: the PyTorch reference (``reference.py``), the
fused Triton kernels (``fused.py``, its kernels in ``kernels.py``, imported on demand: ``fuxi_mme.models.attention.fused``),
the pieces both share (``shared.py``) and the choice between them (``select.py``)."""

from .reference import fuxi_attention_reference, hstu_attention_reference
from .select import select_attention
from .shared import lookup, relative_position_bias, relative_positions, row_mask, semantic_norm, small_table_grad, ungroup

__all__ = [
    "fuxi_attention_reference",
    "hstu_attention_reference",
    "lookup",
    "relative_position_bias",
    "relative_positions",
    "row_mask",
    "select_attention",
    "semantic_norm",
    "small_table_grad",
    "ungroup",
]

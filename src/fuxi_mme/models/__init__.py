"""Model registry: ``build_model(cfg, num_items, max_len)`` picks the family by name."""

from __future__ import annotations

from collections.abc import Callable

from ..config import ModelConfig
from .common import SequenceModel
from .fuxi_alpha import FuxiAlpha
from .fuxi_mme import FuxiMME
from .hstu import HSTU
from .ssm import SSMRec
from .transformer import Llama, SASRec

MODELS: dict[str, Callable[[ModelConfig, int, int], SequenceModel]] = {
    "fuxi-alpha": FuxiAlpha,
    "fuxi-mme": FuxiMME,
    "hstu": HSTU,
    "sasrec": SASRec,
    "llama": Llama,
    "ssm": SSMRec,
}
# Non-neural baselines evaluated by the same harness (see fuxi_mme.eval.popularity).
NON_NEURAL = ("popularity",)


def build_model(cfg: ModelConfig, num_items: int, max_len: int) -> SequenceModel:
    if cfg.name not in MODELS:
        known = ", ".join([*MODELS, *NON_NEURAL])
        raise ValueError(f"unknown model {cfg.name!r}; known: {known}")
    return MODELS[cfg.name](cfg, num_items, max_len)


__all__ = ["MODELS", "NON_NEURAL", "build_model", "SequenceModel"]

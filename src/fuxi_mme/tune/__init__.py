"""Hyperparameter search on the validation split (``fuxi-mme tune``; docs/training.md#tuning)."""

from .search import MedianPruner, RandomSampler, make_sampler, optuna_available
from .space import Param, apply_params, default_space, load_space, parse_space
from .study import Budget, Study

__all__ = [
    "Budget",
    "MedianPruner",
    "Param",
    "RandomSampler",
    "Study",
    "apply_params",
    "default_space",
    "load_space",
    "make_sampler",
    "optuna_available",
    "parse_space",
]

"""Evaluation: pure metric functions and the full-ranking evaluator."""

from .evaluator import evaluate_ranks, evaluate_split, model_scorer, popularity_scorer, rank_split, resolve_history
from .metrics import metrics_from_ranks, ranks_from_scores

__all__ = [
    "evaluate_split",
    "rank_split",
    "resolve_history",
    "evaluate_ranks",
    "model_scorer",
    "popularity_scorer",
    "metrics_from_ranks",
    "ranks_from_scores",
]

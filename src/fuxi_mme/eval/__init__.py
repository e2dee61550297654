"""Evaluation: pure metric functions and the full-ranking evaluator."""

from .evaluator import evaluate, evaluate_ranks, model_scorer, popularity_scorer
from .metrics import metrics_from_ranks, ranks_from_scores

__all__ = ["evaluate", "evaluate_ranks", "model_scorer", "popularity_scorer", "metrics_from_ranks", "ranks_from_scores"]

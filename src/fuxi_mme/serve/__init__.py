"""Inference and serving: batch recommendations, the HTTP service, export."""

from .recommender import Query, Recommender, RequestError

__all__ = ["Query", "Recommender", "RequestError"]

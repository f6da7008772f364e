"""Evaluation metrics. :mod:`.shapeworld`: exact measurements of generated ShapeWorld images."""

from customjax.metrics.shapeworld import appearance_similarity, measure, signature, similarity, summarise

__all__ = ["appearance_similarity", "measure", "signature", "similarity", "summarise"]

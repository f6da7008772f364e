"""Evaluation metrics. :mod:`.shapeworld`: exact measurements of generated ShapeWorld images."""

from customjax.metrics.shapeworld import measure, signature, similarity, summarise

__all__ = ["measure", "signature", "similarity", "summarise"]

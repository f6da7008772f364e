"""Evaluation metrics of the papers: CLIP-T / CLIP-I (:mod:`.clip_score`) and word binding
(:mod:`.binding`). ShapeWorld's exact measurements live in :mod:`customjax.shapeworld.metrics`."""

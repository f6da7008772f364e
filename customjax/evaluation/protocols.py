"""The evaluation protocols by name (``python -m customjax.evaluate --protocol NAME``), as entry points
(``module:class``) loaded on use: the library's DreamBench protocol, and the ShapeWorld lab's comparison,
which the library core never imports (this registry names it; ``tests/test_layering.py`` allows exactly
this door, as the data generators' registry lets the loader find ShapeWorld's training set)."""

from __future__ import annotations

import importlib

PROTOCOLS = {
    "shapeworld": "customjax.shapeworld.benchmark.comparison:ShapeWorldProtocol",
    "dreambench": "customjax.evaluation.dreambench:DreamBenchProtocol",
}


def load_protocol(name: str):
    """The protocol class registered as ``name``."""
    if name not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; choose from {sorted(PROTOCOLS)}")
    module, _, attr = PROTOCOLS[name].partition(":")
    return getattr(importlib.import_module(module), attr)

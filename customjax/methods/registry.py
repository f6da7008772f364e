"""The one registry of methods: ``config.method`` -> the :class:`~customjax.methods.protocol.Method`
that the trainer, the sampler, export, previews and the benchmark dispatch through. Adding a method
is one module under ``customjax/methods/`` plus its name in the tuple below
(docs/adding_a_method.md)."""

from __future__ import annotations

from customjax.methods import realcustom, realcustompp
from customjax.methods.protocol import Method

METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in (realcustom, realcustompp)}


def get(name: str) -> Method:
    """The registered method ``name``, or a ValueError naming the registered ones."""
    if name not in METHODS:
        raise ValueError(f"config.method={name!r} is not a registered method; registered: {sorted(METHODS)}")
    return METHODS[name]

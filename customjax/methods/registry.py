"""The one registry of methods: ``config.method`` -> the :class:`~customjax.methods.protocol.Method`
that the trainer, the sampler, export, previews and the benchmark dispatch through. Adding a method
is one module under ``customjax/methods/`` (holding ``METHOD``) plus its line below
(docs/adding_a_method.md)."""

from __future__ import annotations

import importlib

from customjax.methods.protocol import Method

MODULES = (
    "realcustom",        # RealCustom (seed 003)
    "realcustompp",      # RealCustom++ (seed 004)
    "ip_adapter",        # IP-Adapter (Ye et al. 2023), the unmasked baseline
    "customcontrast",    # CustomContrast (seed 000)
    "finetune",          # per-concept: Textual Inversion, Custom Diffusion, DreamBooth, Contrastive Inversion (seed 001)
    "clif",              # CLIF (seed 002): several concepts learnt together
)
# a module holds one METHOD, or several (METHODS)
METHODS: dict[str, Method] = {m.name: m for mod in (importlib.import_module(f"customjax.methods.{n}") for n in MODULES)
                              for m in getattr(mod, "METHODS", None) or (mod.METHOD,)}


def get(name: str) -> Method:
    """The registered method ``name``, or a ValueError naming the registered ones."""
    if name not in METHODS:
        raise ValueError(f"config.method={name!r} is not a registered method; registered: {sorted(METHODS)}")
    return METHODS[name]

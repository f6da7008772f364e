"""Registry of generated training sets: a name (``config.data.generator``) -> the function that writes
one, so the loader finds e.g. ShapeWorld's without importing it (``customjax.shapeworld`` registers
``"shapeworld"`` when imported; this module registers ``"synthetic"``)."""

from __future__ import annotations

import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Generator:
    """``write(out, n, m, size, seed)``: ``n`` text-image pairs and ``m`` multiview objects of ``size`` px
    as shards under ``out/<kind>``. ``modules``: those whose code makes the bytes (hashed into the cache
    folder's name, so a changed generator writes a new folder)."""

    write: Callable[[str, int, int, int, int], None]
    modules: tuple[str, ...]


GENERATORS: dict[str, Generator] = {}


class GeneratorError(ValueError):
    """A config names a generated training set that is not registered."""


def register_generator(name: str, write: Callable[[str, int, int, int, int], None], modules: tuple[str, ...]) -> None:
    GENERATORS[name] = Generator(write, tuple(modules))


def get_generator(name: str) -> Generator:
    if name not in GENERATORS:
        raise GeneratorError(f"config.data.generator={name!r} is not registered (registered: {sorted(GENERATORS)}); "
                         "import the package that registers it first")
    return GENERATORS[name]


def check_config(config) -> None:
    """Before any model is built: with no shards named, ``config.data.generator`` is registered."""
    d = config.get("data", {})
    if not (d.get("text_image") or d.get("multiview") or d.get("latents")) and d.get("generator"):
        get_generator(d.generator)


def _write_synthetic(out: str, n: int, m: int, size: int, seed: int) -> None:
    from customjax.data.synthetic import make_tiny_dataset

    make_tiny_dataset(out, num_text_image=n, num_multiview=m, size=size, seed=seed)


register_generator("synthetic", _write_synthetic, ("customjax.data.synthetic",))

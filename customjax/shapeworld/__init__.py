"""ShapeWorld: the embedded world with exact metrics, fenced off from the library core (which never
imports it; tests/test_layering.py checks).

* :mod:`.world`: the world, its renderer and dataset writer (``python -m customjax.shapeworld.world``);
* :mod:`.metrics`: exact measurements of generated images (category, colour, position, size, scene);
* :mod:`.pretrain`: pretraining of the base model (``python -m customjax.shapeworld.pretrain``);
* :mod:`.benchmark`: the customization benchmark (``benchmarks/shapeworld_custom.py``);
* :mod:`.assets`: the shipped base model folder, :data:`SHAPEWORLD_BASE`.

Importing this package registers the ``"shapeworld"`` generated training set
(``config.data.generator``, :mod:`customjax.data.generators`).
"""

from customjax.data.generators import register_generator
from customjax.shapeworld.assets import SHAPEWORLD_BASE


def _write_training_set(out: str, n: int, m: int, size: int, seed: int) -> None:
    """The training split: ``n`` text-image pairs, ``m`` 4-frame multiview objects (no eval prompts)."""
    from customjax.shapeworld.world import write_dataset

    write_dataset(out, num_text_image=n, num_multiview=m, size=size, seed=seed, num_eval=0)


register_generator("shapeworld", _write_training_set, ("customjax.shapeworld.world",))

__all__ = ["SHAPEWORLD_BASE"]

"""Textual Inversion (Gal et al. 2023): the word S* alone trains. ``--config configs/textual_inversion.py:VARIANT``
(``tiny``, ``shapeworld``, ``sd15``), run by ``python -m customjax.finetune``. Contrastive Inversion's
appendix A: lr 5e-4, 3000 steps, batch 4."""

from configs import common

REAL_VARIANTS = ("sd15",)


def get_config(arg: str = "shapeworld"):
    variant, extras = common.split_arg(arg)
    c = common.finetune_base("textual_inversion", variant, {"train": ("tokens", 5e-4, 3000)})
    return common.apply_variant(c, extras, {})

"""Custom Diffusion (Kumari et al. 2023): the word and every cross-attention layer's K and V train; prompts
name the concept as "<token> <class>". ``--config configs/custom_diffusion.py:VARIANT`` (``tiny``,
``shapeworld``, ``sd15``). Contrastive Inversion's appendix A: lr 1e-4, 300 steps, batch 4."""

from configs import common

REAL_VARIANTS = ("sd15",)


def get_config(arg: str = "shapeworld"):
    variant, extras = common.split_arg(arg)
    c = common.finetune_base("custom_diffusion", variant, {"train": ("tokens,kv", 1e-4, 300)},
                             phrase="{token} {class}", init_word="ktn")   # diffusers' modifier initializer
    return common.apply_variant(c, extras, {})

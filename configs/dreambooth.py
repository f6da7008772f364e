"""DreamBooth (Ruiz et al. 2023): the whole UNet trains; the word is a frozen rare token ("sks") and
prompts say "<token> <class>". ``--config configs/dreambooth.py:VARIANT`` (``tiny``, ``shapeworld``,
``sd15``). Contrastive Inversion's appendix A: lr 5e-6, 150 steps, batch 4. Exports a whole diffusers
pipeline folder. Preset ``prior``: prior preservation with 100 class images (ShapeWorld 32, tiny 4) that
the base makes with ``prior.prompt`` ("a photo of a {class}"), kept in ``workdir/class_images``."""

from configs import common

REAL_VARIANTS = ("sd15",)


def get_config(arg: str = "shapeworld"):
    variant, extras = common.split_arg(arg)
    c = common.finetune_base("dreambooth", variant, {"train": ("unet", 5e-6, 150)}, phrase="{token} {class}",
                             init_word="sks")
    presets = {"prior": lambda c: c.prior.update(images={"tiny": 4, "shapeworld": 32}.get(variant, 100))}
    return common.apply_variant(c, extras, presets)

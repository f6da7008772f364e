"""Contrastive Inversion (seed 001). ``--config configs/contrastive_inversion.py:VARIANT[,PRESET]``
(``tiny``, ``shapeworld``, ``sd15``: set ``--config.model.path`` to SD-1.5 and ``--config.encoders.clip``
to openai/clip-vit-large-patch14, the CLIP of Eq. 2), run by ``python -m customjax.finetune``.

Stage ``inversion``: S* and one auxiliary word A_i* of n = ``concept.aux_vectors`` vectors per image,
caption "a photo of S* A_i*", diffusion loss + InfoNCE (Eq. 2); stage ``finetune``: the cross-attention
K, V and their copies K^a, V^a over A_i* (Eq. 3). Appendix A: AdamW, weight decay 0.01, batch 4; lr 5e-4
for 2000 steps, then 5e-6 for 150; DDIM 50, guidance 5. Where the paper is silent: n = 4, the InfoNCE
temperature 0.07 and weight 1 (``concept.temperature`` / ``contrastive_weight``), lambda = 1
(``concept.aux_scale``), A_i* start at the mean token embedding, S* at the class word.

Preset ``no_finetune``: Table 1's "Ours w/o LDM Fine-Tuning" (stage 1 only).
"""

from configs import common

REAL_VARIANTS = ("sd15",)
REAL_ENCODERS = {"clip": "clip_l"}     # CLIP ViT-L/14 (openai/clip-vit-large-patch14), the base's own CLIP

PRESETS = {"no_finetune": lambda c: setattr(c, "stage_order", "inversion")}


def get_config(arg: str = "shapeworld"):
    variant, extras = common.split_arg(arg)
    c = common.finetune_base("contrastive_inversion", variant,
                             {"inversion": ("tokens", 5e-4, 2000), "finetune": ("kv,aux_kv", 5e-6, 150)},
                             phrase="{token}")
    if variant == "shapeworld":
        c.encoders.clip = c.model.path + "/clip"
        c.concept.templates = ("a {}",)
    return common.apply_variant(c, extras, PRESETS)

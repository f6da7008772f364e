"""CLIF (seed 002): several concepts learnt together. ``--config configs/clif.py:VARIANT[,PRESET...]``
(``tiny``, ``shapeworld``, ``sd15``: set ``--config.model.path`` to SD-1.5 and ``--config.encoders.clip``
to openai/clip-vit-large-patch14, the frozen image encoder of Eq. 5), run by ``python -m customjax.finetune``
with every concept folder at once (each with ``masks/``; ``regions/`` for R-Aug).

Curation (:mod:`customjax.concepts.augment`, ``config.curation``): G-Aug (``global_per_view`` pastes of each
image into contexts the base generates from ``context_prompts``, ``context_images`` each, or the images of
``context_dir``), R-Aug (``region_per_view`` per image with regions), M-Aug (``mix_per_pair`` per ordered pair).
Stage ``text``: the text encoder and the words (2 tokens per concept, from the class word), Eq. 5, batch 128
and lr 1e-4 as the released code (which accumulates 2 batches; we do not); stage ``unet``: a rank-4 LoRA on
every attention projection, lr 1e-4, batch 4, on the concepts' images and M-Aug. Where the paper is silent:
the step counts (400 and 1000), the InfoNCE temperature 0.07, the LoRA rank and the curation counts.

Presets: Table 2's ``no_gaug``, ``no_raug``, ``no_maug``; Table 1's ``ti`` ("TI + CLIF": stage 2 trains the
words, lr 5e-4, instead of the LoRA) and ``custom`` ("Custom + CLIF": the words and every cross-attention K, V);
``no_contrastive`` (stage 2 alone; ``custom,no_contrastive,no_gaug,no_raug,no_maug`` is Custom Diffusion's
joint multi-concept training, the baseline of the two-concept benchmark); ``frozen_encoder`` (not in the
paper: Eq. 5 moves only the words, the text encoder stays the base's).
"""

import ml_collections

from configs import common

REAL_VARIANTS = ("sd15",)
REAL_ENCODERS = {"clip": "clip_l"}     # CLIP ViT-L/14: the image tower of Eq. 5, the text projection of the base's tower

CONTEXTS = {   # G-Aug's common concepts, made by the base model
    "sd15": ("a policeman", "a dog", "a denim jacket", "a red car", "a wooden chair", "a cat", "a bicycle", "a teapot"),
    "shapeworld": ("a blue circle", "a yellow square", "a green triangle", "a purple heart", "an orange ring",
                   "a cyan cross", "a pink star", "a brown square"),
    "tiny": ("a dog", "a cat"),
}


def _stage2(parts: str, lr: float):
    def edit(c):
        c.stages.unet.parts, c.stages.unet.lr = parts, lr
    return edit


PRESETS = {
    "no_gaug": lambda c: setattr(c.curation, "global_per_view", 0),
    "no_raug": lambda c: setattr(c.curation, "region_per_view", 0),
    "no_maug": lambda c: setattr(c.curation, "mix_per_pair", 0),
    "ti": _stage2("tokens", 5e-4),
    "custom": _stage2("tokens,kv", 1e-4),
    # stage 2 alone (no contrastive text-encoder stage): with "custom" and no augmentation, Custom Diffusion's
    # joint multi-concept training (Kumari et al. 2023: the words and the shared K, V on all concepts' images)
    "no_contrastive": lambda c: setattr(c, "stage_order", "unet"),
    # Eq. 5 moves only the concepts' words; the text encoder stays the base's (not in the paper)
    "frozen_encoder": lambda c: setattr(c.stages.text, "parts", "tokens"),
}


def get_config(arg: str = "shapeworld"):
    variant, extras = common.split_arg(arg)
    c = common.finetune_base("clif", variant, {"text": ("text,tokens", 1e-4, 400), "unet": ("lora", 1e-4, 1000)},
                             phrase="{token}", hflip=False)
    tiny, sw = variant == "tiny", variant == "shapeworld"
    if sw:
        c.encoders.clip = c.model.path + "/clip"     # the base's own CLIP (its text tower is the base's encoder)
    c.stages.text.batch = 8 if tiny else (32 if sw else 128)
    c.stages.unet.batch = 0                       # 0: train.batch
    c.stages.text.loss, c.stages.unet.loss = "contrastive", "diffusion"       # Eq. 5; the diffusion loss
    with c.concept.unlocked():
        # vectors: tokens per concept; joint_names / joint_classes: set by customjax.finetune from the folders
        c.concept.update(dict(vectors=2, lora_rank=4, lora_alpha=4.0, joint_names=(), joint_classes=()))
        c.concept.token = ""          # each concept's tokens are named after its folder (customjax.methods.clif)
    c.curation = ml_collections.ConfigDict(dict(
        global_per_view=2 if tiny else 8, region_per_view=1 if tiny else 4, mix_per_pair=2 if tiny else 8,
        scale=(0.25, 0.5) if sw else (0.3, 0.6), context_prompts=CONTEXTS[variant], context_images=1 if tiny else 2, context_dir="",
        global_templates=("a {concept} and {context}",) if sw else ("a photo of {concept} with {context}",
                                                                    "{concept} and {context}"),
        region_templates=("the {region} of a {concept}",) if sw else ("a photo of the {region} of {concept}",),
        mix_templates=("a {left} on the left and a {right} on the right",) if sw else (
            "a photo of {left} on the left and {right} on the right", "{left} and {right}")))
    c.finetune.preview_prompts = ("a {} on the left and a {} on the right, on a white background",) if sw else (
        "a photo of {} and {}",)
    return common.apply_variant(c, extras, PRESETS)

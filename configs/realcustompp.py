"""RealCustom++ (seed 004). ``--config configs/realcustompp.py:VARIANT[,PRESET...]``.

Variants: ``tiny`` (random tiny SD-1.5-layout pipeline and encoders, CPU), ``tiny_sdxl``, ``sd15``,
``sdxl`` (set ``--config.model.path`` to a diffusers folder and ``--config.encoders.siglip`` /
``--config.encoders.dino`` to SigLIP so400m-patch14-384 and DINOv2-L with registers: Hugging Face
folders or the timm checkpoints of the released code), ``shapeworld``. Presets: the guidance
ablations of Tables V, VI, VII and XII (``configs/common.py: ABLATIONS``), e.g. ``:sdxl,table5_no2``
or ``:sd15,gamma010,binary``; Table VIII's projector rows (``table8_mlp``, ``table8_cross_layer``);
``public``: the released inference (below).
"""

from configs import common

REAL_VARIANTS = ("sd15", "sdxl", "sdxl,public")     # traced at the real sizes by tests/test_real_sizes.py
REAL_ENCODERS = {"siglip": "siglip", "dino": "dino"}    # SigLIP so400m-patch14-384, DINOv2-L with registers


# The released code's negative prompt (prompts/validation_negative.txt of bytedance/RealCustom).
RELEASED_NEGATIVE = (
    "(((naked))), deformed, bad anatomy, disfigured, poorly drawn face, mutation, mutated, extra limb, ugly, "
    "disgusting, poorly drawn hands, missing limb, floating limbs, disconnected limbs, malformed hands, blurry, "
    "((((mutated hands and fingers)))), watermark, watermarked, oversaturated, censored, distorted hands, "
    "amputation, missing hands, obese, doubled face, double hands")


def public(c) -> None:
    """The released SDXL inference code (bytedance/RealCustom, shared/METHODS.md): its projector
    (cross-scale path only, a linear deep projection); its features (penultimate blocks, 768 px
    polyphase views through 8-bit images); the unconditional branch with the released negative
    prompt and a black image's tokens, masked like the conditional branch at visual scale 1; its
    mask (every cross-attention layer, head-averaged, the target tokens' maps resized to latent / 2
    and averaged over layers, max-normalised, top 25% kept soft, no self-attention augmentation,
    computed for the first 12 of 25 steps); its singlestep DPM-Solver++ (trailing timesteps, shifted
    pairing, the last step's x0 decoded), 25 steps, guidance 3.5."""
    c.ccp.update(dict(cross_layer=False, deep_proj="linear"))
    c.encoders.public = True
    c.guidance.update(dict(uncond_image="zero", cross_factors=common._all_factors(c), self_factors=(),
                           gamma_scope=0.25, norm="max", w=3.5, t_stop=12, visual_scale=1.0))
    c.sample.update(dict(sampler="dpm++2s_shifted", steps=25, negative_prompt=RELEASED_NEGATIVE))


PRESETS = {
    "public": public,
    # Table VIII: the projector's paths.
    "table8_mlp": lambda c: c.ccp.update(dict(cross_layer=False, cross_scale=False)),
    "table8_cross_layer": lambda c: c.ccp.update(dict(cross_layer=True, cross_scale=False)),
}


def get_config(arg: str = "shapeworld"):
    variant, extras = common.split_arg(arg)
    c = common.base("realcustompp", variant)
    c.ccp = dict(dim_head=16 if variant.startswith("tiny") else 64, cross_layer=True, cross_scale=True,
                 combine="layer_concat_scale_add", deep_proj="mlp")
    c = common.add_train(c)
    c.data.recipe = "curriculum"             # Table X No. 6
    if variant == "shapeworld":              # multiview masks; the subject's appearance is ~3% of the plain
        c.objective.subject_weight = 9.0     # loss here (benchmarks/appearance_signal.py)
    return common.apply_variant(c, extras, PRESETS)

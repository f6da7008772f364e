"""RealCustom (seed 003). ``--config configs/realcustom.py:VARIANT[,PRESET...]``.

Adaptive scoring module over CLIP image features (``--config.encoders.clip``: a Hugging Face CLIP
vision folder) and the two-scale guidance of Eq. 13 (w_t = 7.5, w_i = 12.5). RealCustom's mask is
the cross-attention of all resolutions without self-attention augmentation or early stop
(Sec. 3.3), gamma_scope 0.25; Table 2 rows via ``gammaNNN`` / ``binary``; Table 3 rows via
``table3_no2`` .. ``table3_no7`` (``no2``: w/o adaptive scoring module).
"""

from configs import common

REAL_VARIANTS = ("sd15", "sdxl")     # traced at the real sizes by tests/test_real_sizes.py
REAL_ENCODERS = {"clip": "clip_l"}           # the CLIP image encoder: ViT-L/14

# Table 3: the adaptive scoring module's ablation (ID-1 is the full model, gamma_num 0.8).
TABLE3 = {
    "table3_no2": dict(fusion="none"),                      # w/o adaptive scoring module: all image features
    "table3_no3": dict(fusion="text", gamma_num=0.8),       # textual score only
    "table3_no4": dict(fusion="visual", gamma_num=0.8),     # visual score only
    "table3_no5": dict(fusion="mean", gamma_num=0.8),       # (textual + visual) / 2
    "table3_no6": dict(gamma_num=0.9),
    "table3_no7": dict(gamma_num=0.7),
}
PRESETS = {name: (lambda kw: lambda c: c.scoring.update(kw))(kw) for name, kw in TABLE3.items()}


def get_config(arg: str = "shapeworld"):
    variant, extras = common.split_arg(arg)
    c = common.base("realcustom", variant)
    if variant in ("sd15", "sdxl"):
        c.encoders.image_size = 224          # the CLIP image encoder's own size (ViT-L/14)
    c.guidance.update(dict(cross_factors=common._all_factors(c), self_factors=(), t_stop=None, gamma_scope=0.25,
                           cfg="two_scale"))
    c.scoring = dict(fusion="schedule", gamma_num=0.8)
    c = common.add_train(c)
    c.data.recipe = "text_image"             # the conference version: text-image reconstruction only
    return common.apply_variant(c, extras, PRESETS)

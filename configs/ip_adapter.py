"""IP-Adapter (Ye et al. 2023), the unmasked baseline. ``--config configs/ip_adapter.py:VARIANT``.

``--config.encoders.clip``: the CLIP image encoder with projection (h94/IP-Adapter
``models/image_encoder`` for SD-1.5: ViT-H/14); ``--checkpoint``: a released ``ip-adapter_sd15.bin`` /
``.safetensors`` or our export. ``--config.guidance.visual_scale``: the adapter scale s (1.0; the
released README suggests 0.5 with a text prompt). Sampling: no mask, the zero image embedding's
tokens in the unconditional branch, guidance 7.5; training: lr 1e-4, the image dropped 5% of the
time as a zero embedding (the released training script).
"""

from configs import common

REAL_VARIANTS = ("sd15",)     # traced at the real sizes by tests/test_real_sizes.py
REAL_ENCODERS = {"clip": "ip_adapter_image_encoder"}     # h94/IP-Adapter models/image_encoder: ViT-H/14


def get_config(arg: str = "shapeworld"):
    variant, extras = common.split_arg(arg)
    c = common.base("ip_adapter", variant)
    c.encoders.update(dict(kind="clip", image_size=28 if variant.startswith("tiny") else 224))
    c.guidance.update(dict(uncond_image="zero", masked=False, t_stop=0, init_mask=1.0, w=7.5, visual_scale=1.0))
    c = common.add_train(c)
    c.data.recipe = "text_image"
    return common.apply_variant(c, extras)

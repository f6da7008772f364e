"""RealCustom++ (seed 004). ``--config configs/realcustompp.py:VARIANT[,ABLATION...]``.

Variants: ``tiny`` (random tiny SD-1.5-layout pipeline and encoders, CPU), ``tiny_sdxl``, ``sd15``,
``sdxl`` (set ``--config.model.path`` to a diffusers folder and ``--config.encoders.siglip`` /
``--config.encoders.dino`` to Hugging Face folders of SigLIP so400m-patch14-384 and DINOv2-L with
registers). Ablation presets (``configs/common.py: ABLATIONS``) reproduce the rows of Tables V,
VI, VII and XII, e.g. ``:sdxl,table5_no2`` or ``:sd15,gamma010,binary``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def get_config(arg: str = "tiny"):
    variant, *extras = (arg or "tiny").split(",")
    c = common.base("realcustompp", variant)
    c.ccp = dict(dim_head=16 if variant.startswith("tiny") else 64, cross_layer=True, cross_scale=True,
                 combine="layer_concat_scale_add", deep_proj="mlp")
    return common.apply_variant(common.add_train(c), extras)

"""RealCustom (seed 003). ``--config configs/realcustom.py:VARIANT[,ABLATION...]``.

Adaptive scoring module over CLIP image features (``--config.encoders.clip``: a Hugging Face CLIP
vision folder) and the two-scale CFG of Eq. 13 (w_t = 7.5, w_i = 12.5). RealCustom's mask is the
cross-attention of all resolutions without self-attention augmentation or early stop (Sec. 3.3),
gamma_scope 0.25; Table 2 rows via ``gammaNNN`` / ``binary``; Table 3 rows via
``--config.scoring.fusion=text|visual|mean`` and ``--config.scoring.gamma_num``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import common  # noqa: E402


def get_config(arg: str = "tiny"):
    variant, *extras = (arg or "tiny").split(",")
    c = common.base("realcustom", variant)
    c.guidance.update(dict(cross_factors=common._all_factors(c), self_factors=(), t_stop=None, gamma_scope=0.25))
    c.scoring = dict(fusion="schedule", gamma_num=0.8)
    return common.apply_variant(common.add_train(c), extras)

"""CustomContrast (seed 000). ``--config configs/customcontrast.py:VARIANT[,PRESET...]``.

Variants: ``tiny`` (random tiny pipeline and CLIP, CPU), ``tiny_sdxl``, ``sd15``, ``sdxl`` (set
``--config.model.path`` to a diffusers folder and ``--config.encoders.clip`` to a CLIP image encoder
folder, openai/clip-vit-large-patch14), ``shapeworld``. Paper defaults (Sec. 4.1): lr 3e-5, 4
Q-former layers, lambda1 = 1e-2, lambda2 = 1e-3. Training reads multiview records with subject
masks (``--config.data.multiview``); the placeholder is each caption's last word.

Presets: Table 3's MFI rows (``visual_only``: ID-0; ``no_fusion``: ID-1, visual + textual without TV
fusion; the default is ID-2), Table 4's loss rows (``no_contrast``: ID-2; ``no_macl``: ID-3, CSCL
only; ``no_cscl``: ID-4, MACL only; the default is ID-5), ``no_location`` (lambda2 = 0), ``per_block``
(one S+ token per transformer model: SDXL's text passes fall from 54% to 15% of the step), and the
guidance presets of ``configs/common.py`` (``gamma010`` ..., ``binary``).
"""

from configs import common

REAL_VARIANTS = ("sd15", "sdxl")       # traced at the real sizes by tests/test_real_sizes.py (per_block: benchmarks/splus_cost.py)
REAL_ENCODERS = {"clip": "clip_l"}     # CLIP ViT-L/14 (openai/clip-vit-large-patch14)

PRESETS = {
    # Table 3: the MFI encoder's parts (the contrastive losses need the textual Q-former's tokens).
    "visual_only": lambda c: c.mfi.update(dict(textual=False, fusion=False)),
    "no_fusion": lambda c: c.mfi.update(dict(fusion=False)),
    # Table 4: the contrastive losses.
    "no_contrast": lambda c: c.losses.update(dict(cscl=False, macl=False)),
    "no_macl": lambda c: c.losses.update(dict(macl=False)),
    "no_cscl": lambda c: c.losses.update(dict(cscl=False)),
    "no_location": lambda c: c.losses.update(dict(lambda2=0.0)),
    # Not in the paper: one S+ token per transformer model, shared by its layers (the SDXL cost).
    "per_block": lambda c: c.mfi.update(dict(tokens="block")),
}


def get_config(arg: str = "shapeworld"):
    variant, extras = common.split_arg(arg)
    c = common.base("customcontrast", variant)
    tiny, sw = variant.startswith("tiny"), variant == "shapeworld"
    # CLIP hidden states read by the MFI encoder (K = 3; 0 = the embeddings): the paper does not name
    # them; thirds of the encoder (ViT-L/14: 8, 16, 24; the ShapeWorld CLIP: its 3 layers).
    c.encoders.update(dict(kind="clip", image_size=28 if tiny else (64 if sw else 224),
                           clip_layers=(0, 1, 2) if tiny else ((1, 2, 3) if sw else (8, 16, 24))))
    # The MFI encoder (Sec. 3.2); the paper gives 4 layers; width, heads and m are ours (docs/customcontrast.md).
    c.mfi = dict(dim=32 if tiny else (128 if sw else 768), heads=2 if tiny else (4 if sw else 12),
                 dim_head=16 if tiny else (32 if sw else 64), layers=2 if tiny else 4,
                 visual_tokens=4 if tiny else 16, textual=True, fusion=True,
                 # "layer": one S+ token per cross-attention layer (the paper); "block": one per transformer
                 # model (SDXL: 11 text passes instead of 70, benchmarks/splus_cost.py)
                 tokens="layer")
    c.losses = dict(lambda1=1e-2, lambda2=1e-3, cscl=True, macl=True, macl_temperature=0.07, min_similarity=0.05)
    # Sampling (Sec. 3.4): the location mask from every cross-attention resolution, at every step; the
    # first step has no mask yet (1 everywhere).
    c.guidance.update(dict(cross_factors=common._all_factors(c), self_factors=(), t_stop=None, init_mask=1.0))
    c = common.add_train(c)
    c.data.recipe = "table10_no2"           # multiview records only: two views and masks per subject
    c.data.subject_reference = True         # the reference cut to its subject, as the second view (the target)
    if not tiny and not sw:
        c.optim.lr = 3e-5                   # Sec. 4.1
    if sw:                                  # as configs/realcustompp.py: the subject's appearance is a few
        c.objective.subject_weight = 9.0    # per cent of the plain loss here (benchmarks/appearance_signal.py)
    return common.apply_variant(c, extras, PRESETS)

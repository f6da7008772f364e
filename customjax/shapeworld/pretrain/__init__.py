"""Pretraining of the ShapeWorld base model with this library's own models: a CLIP-style BPE
tokenizer (:mod:`.tokenizer`), an AutoencoderKL (:mod:`.vae`), a contrastive CLIP
(:mod:`.clip`) and a text-to-image UNet (:mod:`.unet`), each trained by the one jitted,
mesh-sharded loop of :mod:`.loop`, written as a diffusers folder (:mod:`.folder`) and measured
(:mod:`.evaluate`). ``python -m customjax.shapeworld.pretrain --config configs/shapeworld_base.py:cpu``."""

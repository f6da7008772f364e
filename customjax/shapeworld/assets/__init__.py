"""Model folders shipped inside the package.

``SHAPEWORLD_BASE``: the ShapeWorld base model (a diffusers Stable Diffusion folder with the
world's own tokenizer, VAE, CLIP and UNet), made by ``python -m customjax.shapeworld.pretrain`` and loaded
with :func:`customjax.pipeline.load_stable_diffusion` like any SD-1.5 folder.
"""

from pathlib import Path

SHAPEWORLD_BASE = Path(__file__).parent / "shapeworld_base"

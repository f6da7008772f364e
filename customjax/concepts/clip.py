"""The frozen CLIP of Contrastive Inversion's Eq. 2: a text tower whose input embeddings are the
base text encoder's (SD-1.5: openai/clip-vit-large-patch14; ShapeWorld: the base's own ``clip/``),
so a learnt word reads the same in both, and the image tower with its projection."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from customjax.models.clip import CLIP
from customjax.models.clip_text import CLIPTextModel
from customjax.models.vit import CLIPVisionConfig, CLIPVisionModel


def concept_clip(config, pipe, key: jax.Array) -> tuple[CLIP, dict]:
    """(CLIP, {"text", "vision"}) from ``config.encoders.clip`` (a transformers ``CLIPModel`` folder),
    or, when empty, random and tiny with the base text encoder's input width (tests); shapes only
    with ``config.model.abstract``. The text tower's width must equal the base encoder's."""
    from customjax.models.clip_text import clip_text_spec
    from customjax.models.vit import clip_vision_spec
    from customjax.weights.loaders import load_pretrained, param_shapes

    abstract = bool(config.model.get("abstract", False))
    base = pipe.text_encoders[0].config
    path = config.encoders.get("clip", "")
    if path:
        text, tp, tc = load_pretrained(path, clip_text_spec(True), abstract=abstract)
        vision, vp, _ = load_pretrained(path, clip_vision_spec(True), abstract=abstract)
        if tc.hidden_size != base.hidden_size:
            raise ValueError(f"config.encoders.clip={path}: its text tower is {tc.hidden_size} wide, the base text "
                             f"encoder {base.hidden_size}; Eq. 2 needs the base's own CLIP (SD-1.5: clip-vit-large-patch14)")
        return CLIP(text, vision), {"text": tp, "vision": vp}
    tcfg = dataclasses.replace(base, with_projection=True, projection_dim=32)
    vcfg = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=28, patch_size=14, projection_dim=32, with_projection=True)
    shapes = {"text": param_shapes(clip_text_spec(True), tcfg), "vision": param_shapes(clip_vision_spec(True), vcfg)}
    if abstract:
        params = shapes
    else:
        rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
        params = jax.tree_util.tree_map(lambda s: jnp.asarray(0.05 * rng.standard_normal(s.shape, np.float32)), shapes)
    return CLIP(CLIPTextModel(tcfg), CLIPVisionModel(vcfg)), params

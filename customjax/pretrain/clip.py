"""Stage 2: a small CLIP (Radford et al. 2021): text and vision towers with projections trained
with the symmetric InfoNCE loss (CLIP Fig. 3) on image-caption pairs. The towers become the
pipeline's ``text_encoder/`` and ``image_encoder/``; the whole model, with ``logit_scale``, is the
``clip/`` folder that CLIP-T / CLIP-I scores use."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from customjax.models.clip import CLIP
from customjax.models.clip_text import CLIPTextConfig, CLIPTextModel, clip_text_spec
from customjax.models.vit import CLIPVisionConfig, CLIPVisionModel, clip_vision_spec
from customjax.pretrain.loop import StageConfig, fit, sample_indices
from customjax.weights.loaders import init_params


def clip_loss(params, frozen, batch, key, *, model: CLIP):
    t = model.embed_text(params, batch["ids"])
    i = model.embed_image(params, batch["images"])
    logits = jnp.exp(params["logit_scale"]) * i @ t.T
    labels = jnp.arange(logits.shape[0])
    # Identical captions in one batch are positives too (the world repeats descriptions).
    same = (batch["ids"][:, None, :] == batch["ids"][None, :, :]).all(-1)
    target = same / same.sum(-1, keepdims=True)
    loss = 0.5 * (optax.softmax_cross_entropy(logits, target).mean() + optax.softmax_cross_entropy(logits.T, target).mean())
    acc = jnp.mean(jnp.argmax(logits, -1) == labels)
    return loss, {"i2t_top1": acc}


def train_clip(text_cfg: CLIPTextConfig, vision_cfg: CLIPVisionConfig, images: np.ndarray, ids: np.ndarray,
               stage: StageConfig, workdir, seed: int = 0, **fit_kw):
    """(params {"text", "vision", "logit_scale"}, history) trained on uint8 ``images`` and their
    captions' token ``ids``."""
    model = CLIP(CLIPTextModel(text_cfg), CLIPVisionModel(vision_cfg))
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"text": init_params(clip_text_spec(True), text_cfg, k1),
              "vision": init_params(clip_vision_spec(True), vision_cfg, k2),
              "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}
    loss = functools.partial(clip_loss, model=model)

    def batches(step):
        idx = sample_indices(seed + 1, step, len(images), stage.batch)
        return {"images": images[idx].astype(np.float32) / 255.0, "ids": ids[idx]}

    return fit("clip", loss, params, None, batches, stage, workdir, seed=seed, **fit_kw)

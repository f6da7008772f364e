"""Stage 2: a small CLIP (Radford et al. 2021): text and vision towers with projections trained
with the symmetric InfoNCE loss (CLIP Fig. 3) on image-caption pairs. The towers become the
pipeline's ``text_encoder/`` and ``image_encoder/``; the whole model, with ``logit_scale``, is the
``clip/`` folder that CLIP-T / CLIP-I scores use.

In-batch negatives are solved by colours and backgrounds alone, and a text tower trained so keeps
little of the category and position words that the UNet must then read from it. With hard
negatives (NegCLIP, Yuksekgonul et al. 2023, Sec. 5) each image's caption with one category or
position changed joins the image-to-text softmax as a further wrong answer. With a token objective
(``token_weight``) every word's final state must also name its own input token through the tied
token embedding (a cross-entropy over the vocabulary), so that the state the UNet reads keeps each
word and not only what the contrastive loss needs."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from customjax.models.clip import CLIP
from customjax.models.clip_text import CLIPTextConfig, CLIPTextModel, clip_text_spec, eos_positions
from customjax.models.vit import CLIPVisionConfig, CLIPVisionModel, clip_vision_spec
from customjax.shapeworld.pretrain.loop import StageConfig, fit, sample_indices
from customjax.weights.loaders import init_params


def token_loss(text_params, out, ids, eos_token_id: int):
    """(cross-entropy, top-1) of each word's final state (``last_hidden_state``, after the final
    LayerNorm) predicting its own input token, logits against the tied token embedding; over the
    words between BOS and the first EOS."""
    table = text_params["text_model"]["embeddings"]["token_embedding"]["embedding"]
    logits = out.last_hidden_state @ table.T
    pos = jnp.arange(ids.shape[1])
    words = (pos >= 1) & (pos < eos_positions(ids, eos_token_id)[:, None])
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, ids)
    n = jnp.maximum(words.sum(), 1)
    return (ce * words).sum() / n, ((jnp.argmax(logits, -1) == ids) * words).sum() / n


def clip_loss(params, frozen, batch, key, *, model: CLIP, token_weight: float = 0.0):
    t, out = model.text_features(params, batch["ids"])
    i = model.embed_image(params, batch["images"])
    logits = jnp.exp(params["logit_scale"]) * i @ t.T
    labels = jnp.arange(logits.shape[0])
    # Identical captions in one batch are positives too (the world repeats descriptions).
    same = (batch["ids"][:, None, :] == batch["ids"][None, :, :]).all(-1)
    target = same / same.sum(-1, keepdims=True)
    metrics = {"i2t_top1": jnp.mean(jnp.argmax(logits, -1) == labels)}
    t2i = optax.softmax_cross_entropy(logits.T, target).mean()
    if "neg_ids" in batch:   # (B, L) hard negatives: more text columns of the image-to-text softmax
        neg = jnp.exp(params["logit_scale"]) * i @ model.embed_text(params, batch["neg_ids"]).T
        metrics["hard_negative_top1"] = jnp.mean(jnp.diag(logits) > jnp.diag(neg))
        # a negative may describe another image of the batch: a positive for that one
        same_neg = (batch["ids"][:, None, :] == batch["neg_ids"][None, :, :]).all(-1)
        logits = jnp.concatenate([logits, neg], axis=1)
        target = jnp.concatenate([same, same_neg], axis=1)
        target = target / target.sum(-1, keepdims=True)
    loss = 0.5 * (optax.softmax_cross_entropy(logits, target).mean() + t2i)
    if token_weight:
        tok, metrics["token_top1"] = token_loss(params["text"], out, batch["ids"], model.text.config.eos_token_id)
        metrics["token_loss"] = tok
        loss = loss + token_weight * tok
    return loss, metrics


def train_clip(text_cfg: CLIPTextConfig, vision_cfg: CLIPVisionConfig, images: np.ndarray, ids: np.ndarray,
               stage: StageConfig, workdir, seed: int = 0, neg_ids: np.ndarray | None = None,
               token_weight: float = 0.0, **fit_kw):
    """(params {"text", "vision", "logit_scale"}, history) trained on uint8 ``images`` and their
    captions' token ``ids``; ``neg_ids``: a hard-negative caption's ids for each image;
    ``token_weight``: the weight of :func:`token_loss` beside InfoNCE (0: off)."""
    model = CLIP(CLIPTextModel(text_cfg), CLIPVisionModel(vision_cfg))
    k1, k2 = jax.random.split(jax.random.key(seed))
    params = {"text": init_params(clip_text_spec(True), text_cfg, k1),
              "vision": init_params(clip_vision_spec(True), vision_cfg, k2),
              "logit_scale": jnp.asarray(np.log(1 / 0.07), jnp.float32)}
    loss = functools.partial(clip_loss, model=model, token_weight=token_weight)

    def batches(step):
        idx = sample_indices(seed + 1, step, len(images), stage.batch)
        batch = {"images": images[idx].astype(np.float32) / 255.0, "ids": ids[idx]}
        if neg_ids is not None:
            batch["neg_ids"] = neg_ids[idx]
        return batch

    return fit("clip", loss, params, None, batches, stage, workdir, seed=seed, **fit_kw)

"""CLIF (seed 002, ICML 2024): several concepts learnt together so that a prompt naming two of them
draws each with its own appearance. Trained by ``python -m customjax.finetune`` on the curated data of
:mod:`customjax.concepts.augment`; all concepts share one model (``Method.joint``).

  * Each concept is ``concept.vectors`` placeholder tokens (2, as the released code), ``<name>`` and
    ``<name_1>``, initialised from its super-category (class) word; their input rows live in
    ``params["image"]["tokens"]["rows"]`` (:mod:`customjax.concepts.tokens`).
  * Stage ``text`` (Sec. 4.2, Eq. 5): the text encoder (a trainable copy, ``params["image"]["text"]``)
    and the rows are fine-tuned with the symmetric InfoNCE between the text encoder's pooled embedding
    of each augmented caption, projected by the frozen CLIP text projection, and the frozen CLIP image
    embedding of its image (the released code: pooled L-14 text against CLIP ViT-L/14 image features);
    the UNet is not evaluated. Examples of the batch with the same caption are not each other's negatives.
  * Stage ``unet`` (Sec. 4.3): the text encoder frozen, one LoRA on every attention projection of the
    UNet (``lora_down`` / ``lora_up``), shared by all concepts, trained with the diffusion loss on the
    concepts' images and the M-Aug compositions. Parts ``tokens`` / ``kv`` instead give Table 1's
    "CLIF + TI" (the words) and "CLIF + Custom Diffusion" (the words and cross-attention K, V).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from customjax.concepts.tokens import add_placeholders, base_vocab, encode_with_rows, init_rows, row_index
from customjax.control.spec import LoRA
from customjax.methods.common import abstract
from customjax.methods.finetune import is_cross_kv
from customjax.methods.protocol import Condition, ImageSide, Method

PARTS = ("text", "tokens", "lora", "kv")
PAPER = "CLIF (seed 002)"


@dataclasses.dataclass(frozen=True, eq=False)
class Modules:
    """Static modules and settings (hashed by identity)."""

    text: Any                      # the base's text encoder module (stage 2's context)
    pooled: Any                    # the same tower with CLIP's text projection (Eq. 5's text embedding)
    vocab: int
    init_words: tuple[str, ...]    # each row's initializer word
    clip: Any                      # customjax.models.clip.CLIP: its image tower embeds the curated images
    temperature: float
    lora_scale: float


def token_names(name: str, vectors: int) -> list[str]:
    """A concept's placeholder tokens: ``<name>``, ``<name_1>``, ..."""
    if not name or any(ch.isspace() for ch in name):
        raise ValueError(f"concept name {name!r}: CLIF names each concept's tokens after its folder; use a folder "
                         f"name without spaces")
    return [f"<{name}>"] + [f"<{name}_{k}>" for k in range(1, vectors)]


def concept_word(name: str, vectors: int) -> str:
    """The words that stand for the concept in a prompt: its tokens, space-separated."""
    return " ".join(token_names(name, vectors))


class Clif(Method):
    """CLIF; ``parts``: what trains in the current stage (a subset of :data:`PARTS`)."""

    name = "clif"
    paper = PAPER
    adapter = "tokens"
    per_concept = True
    joint = True
    masked = False
    needs = ()
    kv_name = "none"
    auxiliary = False

    def __init__(self, parts: tuple[str, ...] = ("text", "tokens"), loss: str = "contrastive"):
        self.parts, self.loss = tuple(parts), loss
        self.needs = ("image_embeds", "same") if loss == "contrastive" else ()    # Eq. 5's batch, else the diffusion one

    def concept_tokens(self, config, name: str) -> list[str]:
        """The placeholder tokens of the concept ``name`` (:func:`token_names`)."""
        return token_names(name, int(config.concept.vectors))

    @functools.cache
    def stage(self, parts: tuple[str, ...], loss: str = "diffusion") -> "Clif":
        """This method with ``parts`` training under ``loss``: "contrastive" (Eq. 5; the text encoder and / or
        the words) or "diffusion" (any parts; the text encoder then trains with the diffusion loss)."""
        bad = [p for p in parts if p not in PARTS]
        if bad:
            raise ValueError(f"clif: unknown trainable parts {bad}; known: {PARTS}")
        if loss not in ("contrastive", "diffusion"):
            raise ValueError(f"clif: a stage's loss is 'contrastive' (Eq. 5) or 'diffusion', not {loss!r}")
        if loss == "contrastive" and (not parts or set(parts) - {"text", "tokens"}):
            raise ValueError(f"clif: the contrastive stage trains the text encoder and / or the words only; got {parts}")
        return self if (parts, loss) == (self.parts, self.loss) else Clif(tuple(parts), loss)

    def __eq__(self, other) -> bool:
        return isinstance(other, Clif) and (self.parts, self.loss) == (other.parts, other.loss)

    def __hash__(self) -> int:
        return hash(("clif", self.parts, self.loss))

    # -- construction --------------------------------------------------------------------------
    def image_side(self, config, pipe, keys) -> ImageSide:
        from customjax.concepts.clip import concept_clip
        from customjax.models.clip_text import CLIPTextModel

        if pipe.is_sdxl:
            where = config.model.path or "the random SDXL pipeline"
            raise ValueError(f"clif: SD-1.x / 2.x bases (one text encoder); {where} is SDXL")
        c = config.concept
        names, classes = list(c.joint_names), list(c.joint_classes)
        if not names or len(classes) != len(names):
            raise ValueError("clif: config.concept.joint_names / joint_classes name the concepts (customjax.finetune "
                             f"sets them from the concept folders); got {names} / {classes}")
        n = int(c.vectors)
        tok = pipe.tokenizers[0]
        tokens = [t for nm in names for t in self.concept_tokens(config, nm)]
        ids = add_placeholders(tok, tokens)
        vocab = base_vocab(tok)
        if ids != list(range(vocab, vocab + len(tokens))):
            raise ValueError(f"placeholder ids {ids[:3]}...: expected {vocab}.. (the tokenizer already has added tokens)")
        enc = pipe.text_encoders[0]
        D = enc.config.hidden_size
        words = tuple(w for cls in classes for w in [c.init_word or cls or "object"] * n)
        clip, clip_p = concept_clip(config, pipe, keys[0])
        pooled = CLIPTextModel(dataclasses.replace(enc.config, with_projection=True,
                                                   projection_dim=clip.text.config.projection_dim), dtype=enc.dtype)
        rows = jax.ShapeDtypeStruct((len(tokens), D), jnp.float32)
        params = {"tokens": {"rows": rows if abstract(config) else jnp.zeros(rows.shape, rows.dtype)}, "clip": clip_p}
        lora = LoRA(int(c.lora_rank), float(c.lora_alpha) if c.lora_alpha else None)
        mods = Modules(enc, pooled, vocab, words, clip, float(c.temperature), lora.scale)
        return ImageSide(mods, params, None, lora)

    def init_image(self, modules: Modules, image_params: dict, base_params: dict, pipe) -> dict:
        """The rows from the initializer words; ``text``: a trainable copy of the base text encoder."""
        text = base_params["text_encoders"][0]
        rows = image_params["tokens"]["rows"]
        if isinstance(rows, jax.ShapeDtypeStruct):
            return dict(image_params, text=text)
        table = np.asarray(text["text_model"]["embeddings"]["token_embedding"]["embedding"])
        init = init_rows(pipe.tokenizers[0], table, modules.init_words)
        return dict(image_params, tokens={"rows": jnp.asarray(init)}, text=jax.tree_util.tree_map(jnp.array, text))

    def is_trainable(self, path: tuple[str, ...]) -> bool:
        if path[0] in ("tokens", "text", "clip"):
            return path[0] in self.parts
        if "lora_down" in path or "lora_up" in path:
            return "lora" in self.parts
        return "kv" in self.parts and is_cross_kv(path)

    # -- training ------------------------------------------------------------------------------
    def objective(self, built, config):
        """The contrastive stage: Eq. 5 alone (no UNet evaluation)."""
        if self.loss != "contrastive":
            return None
        mods = built.image_side

        def loss(trainable, frozen, batch, key):
            rows = (trainable.get("tokens") or frozen["tokens"])["rows"]
            text = trainable.get("text") or frozen["text"]
            value = clif_infonce(mods, text, frozen["clip"]["text"]["text_projection"], rows, batch["ids"][0],
                                 batch["image_embeds"], batch["same"])
            return value, {"loss": value, "loss/contrastive": value}
        return loss

    def condition(self, modules: Modules, frozen: dict, trainable: dict, batch: dict, x, key, config) -> Condition:
        rows = (trainable.get("tokens") or frozen["tokens"])["rows"]
        ctx, _ = encode_with_rows(modules.text, trainable.get("text") or frozen["text"], batch["ids"], rows, modules.vocab)
        B = ctx.shape[0]
        return Condition(jnp.zeros((B, 1, 1, ctx.shape[-1]), jnp.float32), scale=jnp.zeros((B,)), text=ctx)


def text_embeds(modules: Modules, text_params: dict, projection: dict, rows: jax.Array, ids: jax.Array) -> jax.Array:
    """(B, P) unit vectors: Text-Encoder(p_a) of Eq. 5, the pooled (EOS) state of the fine-tuned text
    encoder, placeholders read from ``rows``, through the frozen CLIP text projection."""
    safe, where = row_index(ids, modules.vocab)
    embeds = jnp.broadcast_to(rows[None], (safe.shape[0],) + rows.shape)
    out = modules.pooled.apply({"params": {"text_model": text_params["text_model"], "text_projection": projection}},
                               safe, replace=(where, embeds))
    return out.text_embeds / jnp.linalg.norm(out.text_embeds, axis=-1, keepdims=True)


def clif_infonce(modules: Modules, text_params: dict, projection: dict, rows: jax.Array, ids: jax.Array,
                 image_embeds: jax.Array, same: jax.Array) -> jax.Array:
    """Eq. 5, symmetric (text->image and image->text, averaged, as CLIP's loss): -log softmax of
    s(Text-Encoder(p_a), f(q_a)) / T over the batch's images q_a^- (and over its captions), with s the
    cosine similarity; ``image_embeds`` (B, P): f(q_a), unit vectors of the frozen image tower;
    ``same`` (B, B) bool: pairs whose captions are equal, dropped from the negatives."""
    t = text_embeds(modules, text_params, projection, rows, ids)
    logits = t @ image_embeds.T / modules.temperature
    B = logits.shape[0]
    logits = jnp.where(same & ~jnp.eye(B, dtype=bool), -jnp.inf, logits)
    to_image = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=1)))
    to_text = -jnp.mean(jnp.diagonal(jax.nn.log_softmax(logits, axis=0)))
    return 0.5 * (to_image + to_text)


METHOD = Clif()

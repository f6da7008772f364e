"""Per-concept fine-tuning methods (``python -m customjax.finetune``): a few images of one concept
in, a learnt word (and fine-tuned weights) out, sampled by plain text-to-image with the word in the
prompt. One class, four registered methods that differ in what trains, stage by stage:

  * ``textual_inversion`` (Gal et al. 2023): the word's input embedding S* only.
  * ``custom_diffusion`` (Kumari et al. 2023): S* and every cross-attention layer's K and V.
  * ``dreambooth`` (Ruiz et al. 2023): the whole UNet; the word is a frozen rare-token embedding.
  * ``contrastive_inversion`` (seed 001): stage 1 learns S* and one auxiliary word A_i* (n vectors) per
    input image with the caption "a photo of S* A_i*", UNet frozen, loss = diffusion (Eq. 1) + InfoNCE
    (Eq. 2) between CLIP-text(A_i*) and CLIP-image(x_i) over the N images; stage 2 fine-tunes K and V
    of every cross-attention layer, where K, V read the caption without the auxiliary words and the
    duplicated K^a, V^a (copies of K, V, :func:`customjax.methods.common.kv_copies`) read only A_i*:
    out = Attn(Q, K, V) + lambda Attn(Q, K^a, V^a) (Eq. 3). K^a, V^a and A_i* are dropped after training.

The learnt words are placeholder tokens (:mod:`customjax.concepts.tokens`), their rows in
``params["image"]["tokens"]["rows"]`` (row 0: S*; then A_i*'s n rows per image). Which parts train
is the stage's (:meth:`Finetune.stage`); the frozen rows of a later stage (and DreamBooth's) ride in
the frozen tree, one per concept when concepts are stacked (:mod:`customjax.concepts.stack`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from customjax.concepts.tokens import add_placeholders, base_vocab, encode_with_rows, init_rows, row_index
from customjax.control.spec import ExtraKV
from customjax.methods.common import abstract, kv_copies
from customjax.methods.protocol import Condition, ImageSide, Method

PARTS = ("tokens", "kv", "unet", "aux_kv")
IMAGE_KEYS = ("tokens", "clip")      # params["image"] entries; every other top-level name is the UNet's


@dataclasses.dataclass(frozen=True, eq=False)
class Modules:
    """Static modules and settings the condition reads (hashed by identity)."""

    text: Any                      # the base's text encoder module
    vocab: int                     # the base vocabulary: placeholder k has id vocab + k
    aux_vectors: int               # n: vectors per auxiliary word (0: no auxiliary words)
    init_words: tuple[str, ...]    # each row's initializer word
    clip: Any = None               # customjax.models.clip.CLIP for Eq. 2 (contrastive_inversion)
    temperature: float = 0.07
    contrastive_weight: float = 1.0
    aux_scale: float = 1.0         # lambda of Eq. 3


def aux_names(token: str, images: int, vectors: int) -> list[str]:
    """The placeholder names of A_i*'s vectors: ``<token>_a{i}_{k}``."""
    stem = token.strip("<>") or "s"
    return [f"<{stem}_a{i}_{k}>" for i in range(images) for k in range(vectors)]


def init_words(c, class_word: str, rows: int) -> tuple[str, ...]:
    """Each row's initializer word (``config.concept`` ``c``): S* from ``concept.init_word``, else the
    concept's class word, else "object"; A_i*'s vectors from ``concept.aux_init_word`` ("" = the mean
    token embedding)."""
    return (c.init_word or class_word or "object",) + (c.aux_init_word,) * (rows - 1)


def is_cross_kv(path: tuple[str, ...], suffix: str = "") -> bool:
    """A cross-attention layer's ``to_k`` / ``to_v`` kernel (``attn2``), or of the extra set ``suffix``."""
    return "attn2" in path and len(path) >= 2 and path[-2] in (f"to_k{suffix}", f"to_v{suffix}")


class Finetune(Method):
    """A per-concept method; ``parts``: what trains in the current stage (a subset of :data:`PARTS`)."""

    adapter = "tokens"
    per_concept = True
    masked = False
    needs = ()
    kv_name = "aux"

    def __init__(self, name: str, paper: str, parts: tuple[str, ...], auxiliary: bool = False):
        self.name, self.paper, self.parts, self.auxiliary = name, paper, tuple(parts), auxiliary
        if auxiliary:
            self.needs = ("index",)

    @functools.cache
    def stage(self, parts: tuple[str, ...], loss: str = "diffusion") -> "Finetune":
        """This method with ``parts`` training (one object per parts: methods are static arguments)."""
        if loss != "diffusion":
            raise ValueError(f"{self.name}: its stages train with the diffusion loss; config.stages asks for {loss!r}")
        bad = [p for p in parts if p not in PARTS]
        if bad:
            raise ValueError(f"{self.name}: unknown trainable parts {bad}; known: {PARTS}")
        if parts == self.parts:
            return self
        return Finetune(self.name, self.paper, tuple(parts), self.auxiliary)

    def __eq__(self, other) -> bool:
        return isinstance(other, Finetune) and (self.name, self.parts) == (other.name, other.parts)

    def __hash__(self) -> int:
        return hash((self.name, self.parts))

    # -- construction --------------------------------------------------------------------------
    def image_side(self, config, pipe, keys) -> ImageSide:
        if pipe.is_sdxl:
            raise ValueError(f"{self.name}: per-concept fine-tuning supports SD-1.x / 2.x bases (one text "
                             f"encoder); {config.model.path or 'the random SDXL pipeline'} is SDXL")
        c = config.concept
        tok = pipe.tokenizers[0]
        n_img, n_vec = (int(c.images), int(c.aux_vectors)) if self.auxiliary else (0, 0)
        names = [c.token] + aux_names(c.token, n_img, n_vec)
        ids = add_placeholders(tok, names)
        vocab = base_vocab(tok)
        if ids != list(range(vocab, vocab + len(names))):
            raise ValueError(f"placeholder ids {ids[:3]}...: expected {vocab}.. (the tokenizer already has added tokens)")
        D = pipe.text_encoders[0].config.hidden_size
        # the rows start as placeholders; init_image sets them from the base's table (initializer words)
        words = init_words(c, c.class_word, len(names))
        rows = jax.ShapeDtypeStruct((len(names), D), jnp.float32)
        params, clip = {"tokens": {"rows": rows if abstract(config) else jnp.zeros(rows.shape, rows.dtype)}}, None
        if self.auxiliary:
            from customjax.concepts.clip import concept_clip
            clip, params["clip"] = concept_clip(config, pipe, keys[0])
        mods = Modules(pipe.text_encoders[0], vocab, n_vec, words, clip, float(c.get("temperature", 0.07)), float(c.get("contrastive_weight", 1.0)),
                       float(c.get("aux_scale", 1.0)))
        return ImageSide(mods, params, ExtraKV("aux", D) if self.auxiliary else None)

    def init_image(self, modules: Modules, image_params: dict, base_params: dict, pipe) -> dict:
        """The rows of S* (and A_i*) as the mean input embedding of their initializer words."""
        rows = image_params["tokens"]["rows"]
        if isinstance(rows, jax.ShapeDtypeStruct):
            return image_params
        table = np.asarray(base_params["text_encoders"][0]["text_model"]["embeddings"]["token_embedding"]["embedding"])
        init = init_rows(pipe.tokenizers[0], table, modules.init_words)
        return dict(image_params, tokens={"rows": jnp.asarray(init)})

    def is_trainable(self, path: tuple[str, ...]) -> bool:
        if path[0] in IMAGE_KEYS:
            return path[0] == "tokens" and "tokens" in self.parts
        if is_cross_kv(path, "_aux"):
            return "aux_kv" in self.parts
        if "unet" in self.parts:
            return True
        return "kv" in self.parts and is_cross_kv(path)

    def init_extra_kv(self, unet_params: Any) -> Any:
        return kv_copies(unet_params, "aux") if self.auxiliary else unet_params

    # -- training ------------------------------------------------------------------------------
    def condition(self, modules: Modules, frozen: dict, trainable: dict, batch: dict, x, key, config) -> Condition:
        rows = (trainable.get("tokens") or frozen["tokens"])["rows"]
        text = frozen["text_encoders"]
        B = batch["ids"][0].shape[0]
        none = jnp.zeros((B, 1, 1, rows.shape[-1]), jnp.float32)
        if not self.auxiliary:
            ctx, _ = encode_with_rows(modules.text, text[0], batch["ids"], rows, modules.vocab)
            return Condition(none, scale=jnp.zeros((B,)), text=ctx)
        if "aux_kv" not in self.parts:      # stage 1: "a photo of S* A_i*" and Eq. 2
            ctx, _ = encode_with_rows(modules.text, text[0], batch["ids"], rows, modules.vocab)
            losses = {"contrastive": modules.contrastive_weight * aux_infonce(modules, frozen["clip"], rows, batch)}
            return Condition(none, scale=jnp.zeros((B,)), text=ctx, losses=losses)
        # stage 2 (Eq. 3): K, V read the caption without A_i*; K^a, V^a only A_i*'s states
        ctx, _ = encode_with_rows(modules.text, text[0], batch["target_ids"], rows, modules.vocab)
        full, _ = encode_with_rows(modules.text, text[0], batch["ids"], rows, modules.vocab)
        aux = row_index(batch["ids"][0], modules.vocab)[1] > 1          # rows after S*
        return Condition(full[:, None], token_mask=aux[:, None], scale=jnp.full((B,), modules.aux_scale), text=ctx)


def aux_infonce(modules: Modules, clip_params: dict, rows: jax.Array, batch: dict) -> jax.Array:
    """Eq. 2, averaged over the N images: -log softmax_j sim(tau_T(A_i*), tau_I(x_j)) / T at j = i, with
    tau_T of the word A_i* alone (``batch["aux_ids"]`` (B, N, T), the same N prompts in every example)
    through the frozen CLIP text tower and projection, and ``batch["image_embeds"]`` (B, N, P) the
    frozen CLIP image embeddings of the concept's N images."""
    ids = batch["aux_ids"][0][0]           # (N, T): the same in every example
    safe, where = row_index(ids, modules.vocab)
    embeds = jnp.broadcast_to(rows[None], (safe.shape[0],) + rows.shape)
    out = modules.clip.text.apply({"params": clip_params["text"]}, safe, replace=(where, embeds))
    t = out.text_embeds / jnp.linalg.norm(out.text_embeds, axis=-1, keepdims=True)
    img = batch["image_embeds"][0]
    return -jnp.mean(jnp.diagonal(jax.nn.log_softmax(t @ img.T / modules.temperature, axis=-1)))


PAPER_CI = "Contrastive Inversion (seed 001)"
METHODS = (
    Finetune("textual_inversion", "Textual Inversion (Gal et al. 2023)", ("tokens",)),
    Finetune("custom_diffusion", "Custom Diffusion (Kumari et al. 2023)", ("tokens", "kv")),
    Finetune("dreambooth", "DreamBooth (Ruiz et al. 2023)", ("unet",)),
    Finetune("contrastive_inversion", PAPER_CI, ("tokens",), auxiliary=True),
)

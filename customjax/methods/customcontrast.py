"""CustomContrast (seed 000): the MFI encoder (Sec. 3.2, Eqs. 2-3) on CLIP features of K image
layers gives m visual tokens for a parallel visual cross-attention (gamma = 1) and l S+ tokens, one
per cross-attention layer, that replace the placeholder word in that layer's text (Eq. 5); the
contrastive losses CSCL (Eq. 4) and MACL (Eq. 7) and the location loss (Eq. 8) join the diffusion
loss (Eq. 9). Sampling (Sec. 3.4): the textual Q-former's queries depend on the timestep, so the S+
text is made at every step; the location mask of step t + 1 narrows the visual attention and the
placeholder's text attention at step t (``customjax.guidance.location``).

Trainable: the MFI encoder (``mfi``) and the visual K/V ``to_k_vision`` / ``to_v_vision``, which
start as copies of the layer's ``to_k`` / ``to_v`` (as IP-Adapter's; the paper does not say).
Data (``needs``): the reference view and the target's subject mask. The placeholder is the caption's
last word (a multiview record's caption is its category, "a star"; "a photo of a dog"). Each example
brings two views of its subject, the reference (cut to its subject: ``data.subject_reference``) and the
target cut to its mask the same way (on the host, :meth:`CustomContrast.host_inputs`), so MACL's
positive of every view is in the same example and therefore on the same device; r_ij is the CLIP
image-embedding cosine of the segmented views.

Where the paper is silent (docs/customcontrast.md): the CLIP layers (``encoders.clip_layers``, thirds of
the encoder), the Q-former width, m, the MACL temperature (0.07), the aggregation of the location
maps (:mod:`customjax.guidance.location`), and the inference mask's Top-K (``guidance.gamma_scope``).
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from customjax import contrastive
from customjax.adapters.mfi import MFIConfig, MFIEncoder
from customjax.control.spec import Capture, ExtraKV
from customjax.guidance.location import location_maps
from customjax.methods.common import abstract, encoder, init, kv_copies
from customjax.methods.protocol import Condition, ImageSide, Method, jit_method
from customjax.models.pixels import normalize, resize_images
from customjax.models.vit import CLIP_MEAN, CLIP_STD
from customjax.pipeline import encode_splus

_WORD = re.compile(r"[^\W_]+")


@dataclasses.dataclass(frozen=True)
class Losses:
    """Eq. 9's weights and the switches of Table 4 (``cscl`` / ``macl`` off: the "w/o" rows)."""

    lambda1: float = 1e-2
    lambda2: float = 1e-3
    cscl: bool = True
    macl: bool = True
    cscl_temperature: float = 1.0
    macl_temperature: float = 0.07
    min_similarity: float = 0.05
    location_factors: tuple[int, ...] = (1, 2, 4, 8)
    mask_factor: int = 1


@dataclasses.dataclass(frozen=True)
class Modules:
    """Static: the CLIP image encoder, the CLIP ``layers`` (indices into its hidden states, 0 = the
    embeddings) whose features are concatenated, the MFI encoder, the base pipeline (its text
    encoders make the S+ text in training), the loss settings and which S+ token each cross-attention
    layer reads (``config.mfi.tokens``: ``"layer"``, one token per layer as the paper; ``"block"``, one
    per transformer model, shared by its layers: SDXL 11 instead of 70 text passes)."""

    clip: Any
    layers: tuple[int, ...]
    mfi: MFIEncoder
    pipe: Any
    losses: Losses
    token_of_layer: tuple[int, ...] = ()      # the S+ token each cross-attention layer reads (mfi.tokens)


def clip_outputs(modules: Modules, params: dict, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(f_I (B, N, K * C): the K layers' hidden states concatenated, the image embedding (B, P):
    ``image_embeds`` with a projection, else the pooled CLS) of images (B, H, W, 3) in [0, 1]."""
    px = normalize(resize_images(images, modules.clip.config.image_size), CLIP_MEAN, CLIP_STD)
    out = modules.clip.apply({"params": params["clip"]}, px)
    f = jnp.concatenate([out.hidden_states[i] for i in modules.layers], axis=-1)
    return f, out.image_embeds if out.image_embeds is not None else out.pooler_output


def segmented_views(images: np.ndarray, masks: np.ndarray, size: int) -> np.ndarray:
    """The targets (B, H, W, 3) in [-1, 1] cut to their subject masks (B, H, W) in [0, 1], object-centric
    on a neutral fill as the references are (:func:`customjax.data.images.subject_cutout`), (B, size,
    size, 3) in [0, 1]; a target whose mask is empty stays whole."""
    from PIL import Image

    from customjax.data.images import subject_cutout

    out = np.empty((len(images), size, size, 3), np.float32)
    for i, (im, m) in enumerate(zip(images, masks)):
        rgb = Image.fromarray(np.clip((np.asarray(im) + 1.0) * 127.5 + 0.5, 0, 255).astype(np.uint8))
        cut = subject_cutout(rgb, Image.fromarray((np.asarray(m) * 255.0 + 0.5).astype(np.uint8)))
        view = rgb if cut is None else cut[0]
        out[i] = np.asarray(view.resize((size, size), Image.BICUBIC), np.float32) / 255.0
    return out


def placeholder_mask(tokenizer, captions) -> np.ndarray:
    """(B, 77) bool: the tokens of each caption's last word, the placeholder the S+ tokens replace."""
    from customjax.tokenizer import word_token_mask

    words = []
    for c in captions:
        found = _WORD.findall(str(c))
        if not found:
            raise ValueError(f"customcontrast: caption {str(c)!r} has no word to serve as the placeholder "
                             "(the caption's last word, e.g. 'a photo of a dog')")
        words.append(found[-1])
    return word_token_mask(tokenizer, [str(c) for c in captions], words)


def mfi_at(mfi: MFIEncoder, params, feats: jax.Array, t: jax.Array) -> dict:
    """The MFI outputs for reference features (B, R, N, D) at one timestep t, each (B, R, ...)."""
    B, R = feats.shape[:2]
    out = mfi.apply({"params": params}, feats.reshape(B * R, *feats.shape[2:]), jnp.broadcast_to(t, (B * R,)))
    return {k: v.reshape(B, R, *v.shape[1:]) for k, v in out.items()}


@dataclasses.dataclass(frozen=True)
class MFIVisual:
    """The sampler's per-step visual tokens: the MFI encoder at timestep t (TV fusion reads f_t)."""

    mfi: MFIEncoder

    def __call__(self, adapter_params, feats, text_ctx, z, sqrt_abar, t=None):
        return mfi_at(self.mfi, adapter_params, feats, t)["visual_tokens"], None


@dataclasses.dataclass(frozen=True)
class MFIText:
    """The sampler's per-step S+ tokens (B, R, n, D_in) at timestep t; ``layers``: the token each
    cross-attention layer reads. The sampler calls it beside :class:`MFIVisual` with the same inputs
    in one jitted program: the encoder is written twice per step (XLA may merge the identical
    computations; not checked), small beside the UNet calls."""

    mfi: MFIEncoder
    layers: tuple[int, ...]

    def __call__(self, adapter_params, feats, t):
        return mfi_at(self.mfi, adapter_params, feats, t)["text_tokens"]


class CustomContrast(Method):
    name = "customcontrast"
    paper = "CustomContrast (seed 000)"
    adapter = "mfi"
    needs = ("reference", "mask")
    location = True

    def image_side(self, config, pipe, keys):
        m = config.mfi
        clip, cp = encoder(config, "clip", config.encoders.clip, keys[0])
        layers = tuple(int(i) for i in config.encoders.clip_layers)
        n_hidden = clip.config.num_hidden_layers
        if not layers or max(layers) > n_hidden or min(layers) < 0:
            raise ValueError(f"config.encoders.clip_layers={layers}: the CLIP image encoder has hidden states "
                             f"0..{n_hidden} (0 = the embeddings)")
        u = pipe.unet.config
        cross = u.cross_attention_dim[0]
        share = m.get("tokens", "layer")
        if share not in ("layer", "block"):
            raise ValueError(f"config.mfi.tokens={share!r}: 'layer' (one S+ token per cross-attention layer, the "
                             "paper) or 'block' (one per transformer model)")
        of_layer = tuple(range(u.num_cross_layers)) if share == "layer" else u.cross_layer_blocks()
        c = MFIConfig(image_dim=len(layers) * clip.config.hidden_size, dim=m.dim, heads=m.heads, dim_head=m.dim_head,
                      layers=m.layers, visual_tokens=m.visual_tokens, cross_layers=max(of_layer) + 1,
                      text_dim=sum(e.config.hidden_size for e in pipe.text_encoders), cross_dim=cross,
                      fusion=bool(m.fusion), textual=bool(m.textual))
        mfi = MFIEncoder(c)
        n = (clip.config.image_size // clip.config.patch_size) ** 2 + 1
        p = init(mfi, keys[2], jnp.zeros((1, n, c.image_dim)), jnp.zeros((1,), jnp.int32), shapes_only=abstract(config))
        lc = config.losses
        g = config.guidance
        losses = Losses(lambda1=float(lc.lambda1), lambda2=float(lc.lambda2), cscl=bool(lc.cscl), macl=bool(lc.macl),
                        macl_temperature=float(lc.macl_temperature), min_similarity=float(lc.min_similarity),
                        location_factors=tuple(g.cross_factors), mask_factor=int(g.mask_factor))
        return ImageSide(Modules(clip, layers, mfi, pipe, losses, of_layer), {"clip": cp, "mfi": p},
                         ExtraKV(self.kv_name, cross))

    def init_extra_kv(self, unet_params):
        return kv_copies(unet_params, self.kv_name)

    def host_inputs(self, batch, tokenizers):
        """``placeholder`` (B, 77) bool, the caption's last word; ``view`` (B, S, S, 3), the target's
        segmented subject at the reference side S: the second view of each example (MACL's positive)."""
        if "image" not in batch or "mask" not in batch:
            raise ValueError("customcontrast trains on images with subject masks (config.data: multiview records "
                             "with masks, not precomputed latents); the batch holds "
                             f"{sorted(k for k in batch if not k.startswith('_'))}")
        size = np.shape(batch["reference"])[1]
        return {"placeholder": placeholder_mask(tokenizers[0], batch["caption"]),
                "view": segmented_views(np.asarray(batch["image"]), np.asarray(batch["mask"]), size)}

    # -- training ------------------------------------------------------------------------------
    def condition(self, modules, frozen, trainable, batch, x, key, config):
        ref = batch["reference"]
        B = ref.shape[0]
        views = jnp.concatenate([ref, batch["view"]])                      # (2B, S, S, 3): both views
        f, emb = jax.lax.stop_gradient(clip_outputs(modules, frozen, views))
        out = modules.mfi.apply({"params": trainable["mfi"]}, f, jnp.concatenate([x.t, x.t]))
        tokens = out["visual_tokens"][:B, None]
        lc, losses, text = modules.losses, {}, None
        if modules.mfi.config.textual:
            s_plus = out["text_tokens"]                                       # (2B, n, D_in)
            ctx, _ = encode_splus(modules.pipe, frozen["text_encoders"], batch["ids"], batch["placeholder"], s_plus[:B])
            ctx = jnp.swapaxes(ctx[:, jnp.asarray(modules.token_of_layer)], 0, 1)   # (L, B, 77, D)
            plain = jnp.broadcast_to(x.ctx, ctx.shape)
            text = jnp.where(x.drop_image[None, :, None, None], plain, ctx)   # no image: the caption's own text
            if lc.cscl:                                                       # Eq. 4 over the references
                losses["cscl"] = lc.lambda1 * contrastive.cscl_loss(out["visual_cls"][:B], out["text_cls"][:B],
                                                                    lc.cscl_temperature)
            if lc.macl:                                                       # Eq. 7 over both views
                r = contrastive.cosine_matrix(emb, emb)
                subject = jnp.concatenate([jnp.arange(B), jnp.arange(B)])
                losses["macl"] = lc.lambda1 * contrastive.macl_loss(s_plus, subject, r, lc.macl_temperature,
                                                                    lc.min_similarity)
        return Condition(tokens, losses=losses, text=text)

    def capture(self, modules):
        fs = modules.losses.location_factors
        return Capture(cross_probs=fs, extra_probs=fs) if modules.losses.lambda2 else Capture()

    def attention_losses(self, modules, state, batch, x, config):
        """Eq. 8 (as :func:`customjax.contrastive.location_loss`) on the examples that keep both conditions."""
        lat = x.z_t.shape[1:3]
        hw = (lat[0] // modules.losses.mask_factor, lat[1] // modules.losses.mask_factor)
        a = location_maps(state, self.kv_name, batch["placeholder"][:, None], lat, hw)[:, 0]     # (B, h, w)
        m = jax.image.resize(batch["mask"].astype(jnp.float32), (a.shape[0], *hw), method="linear", antialias=True)
        per = jax.vmap(contrastive.location_loss)(a, m)
        keep = ~x.drop_image if x.drop_text is None else ~(x.drop_image | x.drop_text)
        w = keep.astype(jnp.float32)
        return {"location": modules.losses.lambda2 * jnp.sum(per * w) / jnp.maximum(w.sum(), 1.0)}

    # -- sampling ------------------------------------------------------------------------------
    @jit_method
    def reference_tokens(self, modules, params, images):
        """f_I (B, N, K * C): the MFI encoder runs per step (its textual queries read the timestep)."""
        return clip_outputs(modules, params, images)[0]

    def visual(self, modules, config):
        return MFIVisual(modules.mfi)

    def text_tokens(self, modules, config):
        return MFIText(modules.mfi, modules.token_of_layer) if modules.mfi.config.textual else None


METHOD = CustomContrast()

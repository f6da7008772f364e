"""IP-Adapter (Ye et al. 2023): decoupled cross-attention with image-prompt tokens, the unmasked
baseline. A CLIP image embedding of the reference (``image_embeds``, the projected pooled output of
``CLIPVisionModelWithProjection``, ViT-H/14 for SD-1.5) -> ``image_proj``: LayerNorm(Linear(e)
reshaped to 4 tokens of the cross-attention width) -> new ``to_k_ip`` / ``to_v_ip`` in every
cross-attention layer, ``out = Attn(Q, K_t, V_t) + s Attn(Q, K_i, V_i)`` before ``to_out``.

Trainable: ``image_proj`` and ``to_k_ip`` / ``to_v_ip`` (initialised from the same layer's ``to_k`` /
``to_v``, as the released training script). Data: a reference per example (the image itself).
Condition dropout of the image is a zero embedding, as the released training; sampling has no
mask, and its unconditional branch is the zero embedding's tokens at the same scale
(``guidance.uncond_image = "zero"``, ``"one_scale"``, w = 7.5).

Checkpoints: the released files (``ip-adapter_sd15.bin`` with ``{"image_proj": ..., "ip_adapter":
...}``, or ``.safetensors`` with ``image_proj.`` / ``ip_adapter.`` keys) are read strictly, and our
export writes those names, so diffusers' ``load_ip_adapter`` reads it: ``image_proj.proj.{weight,
bias}``, ``image_proj.norm.{weight,bias}``, ``ip_adapter.<n>.to_{k,v}_ip.weight`` with n = 1, 3, 5,
... numbering the cross-attention layers in diffusers' ``unet.attn_processors`` order (down blocks,
up blocks, then the mid block; n - 1 the self-attention beside it).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from customjax.models.pixels import normalize, resize_images
from customjax.control.spec import ExtraKV
from customjax.methods.common import TINY_CLIP, abstract, encoder, init, kv_copies
from customjax.methods.protocol import Condition, ImageSide, Method, jit_method
from customjax.models.vit import CLIP_MEAN, CLIP_STD
from customjax.weights.convert import KeyedMismatchError

TOKENS = 4
KV = "ip"
_BLOCK = re.compile(r"^(down_blocks|up_blocks|mid_block)(?:_(\d+))?$")


class ImageProjection(nn.Module):
    """``image_proj``: Linear(image_embeds -> tokens * cross_dim), reshaped, LayerNorm."""

    cross_dim: int
    tokens: int = TOKENS
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, embeds: jax.Array) -> jax.Array:
        x = nn.Dense(self.tokens * self.cross_dim, dtype=self.dtype, name="proj")(embeds)
        return nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name="norm")(x.reshape(-1, self.tokens, self.cross_dim))


@dataclasses.dataclass(frozen=True)
class Modules:
    clip: Any
    proj: ImageProjection


def image_embeds(modules: Modules, params: dict, images: jax.Array) -> jax.Array:
    """CLIP ``image_embeds`` (B, projection_dim) of images (B, H, W, 3) in [0, 1] (CLIP normalisation
    at the encoder's size)."""
    px = normalize(resize_images(images, modules.clip.config.image_size), CLIP_MEAN, CLIP_STD)
    return modules.clip.apply({"params": params["clip"]}, px).image_embeds


def cross_attention_order(unet_params: Any) -> list[tuple[str, ...]]:
    """The UNet's ``attn2`` module paths in diffusers' ``attn_processors`` order."""
    paths = {k[:k.index("attn2") + 1] for k in traverse_util.flatten_dict(unet_params) if "attn2" in k}

    def key(p):
        m = _BLOCK.match(p[0])
        kind = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}[m.group(1)]
        nums = [int(x) for part in p[1:] for x in re.findall(r"_(\d+)$", part)]
        return (kind, int(m.group(2) or 0), *nums)
    return sorted(paths, key=key)


def public_names(unet_params: Any) -> dict[str, tuple[str, ...]]:
    """Released key -> our parameter path, for the UNet's K/V (``ip_adapter.<n>.to_k_ip.weight``)."""
    out = {}
    for i, p in enumerate(cross_attention_order(unet_params)):
        for kv in ("k", "v"):
            out[f"ip_adapter.{2 * i + 1}.to_{kv}_{KV}.weight"] = ("unet", *p, f"to_{kv}_{KV}", "kernel")
    return out


class IPAdapterCheckpointError(KeyedMismatchError):
    """An IP-Adapter file that does not fit the model, listed by its released key."""

    layout = "the IP-Adapter layout"


_PROJ = {"image_proj.proj.weight": ("image_proj", "proj", "kernel"), "image_proj.proj.bias": ("image_proj", "proj", "bias"),
         "image_proj.norm.weight": ("image_proj", "norm", "scale"), "image_proj.norm.bias": ("image_proj", "norm", "bias")}
_VARIANTS = {"latents": "IP-Adapter Plus / Plus-Face (a Resampler)", "proj.0.weight": "IP-Adapter Full-Face or FaceID "
             "(an MLP projection)", "perceiver_resampler": "IP-Adapter FaceID Plus"}


def _released_state(path: Path) -> dict[str, np.ndarray]:
    """A released file as flat ``image_proj.*`` / ``ip_adapter.*`` keys (``.bin`` / ``.pt`` read with
    ``weights_only=True``; its nested dict flattened)."""
    if path.suffix == ".safetensors":
        from customjax.weights.safetensors_io import load_file
        return dict(load_file(path))
    import torch
    raw = torch.load(path, map_location="cpu", weights_only=True)
    flat = {}
    for group, tensors in raw.items():
        items = tensors.items() if isinstance(tensors, dict) else [("", tensors)]
        for k, v in items:
            flat[f"{group}.{k}" if k else group] = v.float().numpy()
    return flat


class IPAdapter(Method):
    name = "ip_adapter"
    paper = "IP-Adapter (Ye et al. 2023)"
    adapter = "image_proj"
    kv_name = KV
    masked = False

    def image_side(self, config, pipe, keys):
        tiny = dataclasses.replace(TINY_CLIP, with_projection=True, projection_dim=32)
        clip, cp = encoder(config, "clip", config.encoders.clip, keys[0], tiny=tiny)
        if not clip.config.with_projection:
            raise ValueError(f"config.encoders.clip={config.encoders.clip!r}: IP-Adapter reads image_embeds, so the "
                             "folder must be a CLIPVisionModelWithProjection (h94/IP-Adapter models/image_encoder)")
        cross = pipe.unet.config.cross_attention_dim[0]
        proj = ImageProjection(cross, dtype=jnp.dtype(config.model.dtype))
        p = init(proj, keys[2], jnp.zeros((1, clip.config.projection_dim)), shapes_only=abstract(config))
        return ImageSide(Modules(clip, proj), {"clip": cp, "image_proj": p}, ExtraKV(KV, cross))

    def init_extra_kv(self, unet_params):
        """``to_k_ip`` / ``to_v_ip`` start as copies of the layer's ``to_k`` / ``to_v``."""
        return kv_copies(unet_params, KV)

    def reference_size(self, config) -> int:
        return int(config.encoders.image_size)

    def condition(self, modules, frozen, trainable, batch, x, key, config):
        e = jax.lax.stop_gradient(image_embeds(modules, frozen, batch["reference"]))
        e = jnp.where(x.drop_image[:, None], 0.0, e)                 # a dropped image is a zero embedding
        tokens = modules.proj.apply({"params": trainable["image_proj"]}, e)
        return Condition(tokens[:, None], scale=jnp.ones(e.shape[:1], jnp.float32))

    @jit_method
    def reference_tokens(self, modules, params, images):
        return modules.proj.apply({"params": params["image_proj"]}, image_embeds(modules, params, images))

    @jit_method
    def null_tokens(self, modules, params, images):
        """The projection of a zero image embedding (diffusers' negative image embeds)."""
        e = jnp.zeros((images.shape[0], modules.clip.config.projection_dim), jnp.float32)
        return modules.proj.apply({"params": params["image_proj"]}, e)

    def state_dict(self, trainable):
        flat = traverse_util.flatten_dict({"unet": trainable["unet"], "image_proj": trainable["image_proj"]})
        names = {**public_names(trainable["unet"]), **_PROJ}
        return {k: (np.asarray(flat[p]).T if p[-1] == "kernel" else np.asarray(flat[p])) for k, p in names.items()}

    def load_state_dict(self, state, target, name):
        for key, what in _VARIANTS.items():
            if any(k.startswith("image_proj.") and key in k for k in state):
                raise ValueError(f"{name}: an {what} checkpoint; only the plain IP-Adapter (image_proj.proj / "
                                 "image_proj.norm, 4 tokens) is supported")
        names = {**public_names(target["unet"]), **_PROJ}
        flat_t = traverse_util.flatten_dict(target)
        out, mismatched = {}, []
        for k, p in names.items():
            if k not in state:
                continue
            a = np.asarray(state[k], np.float32)
            a = a.T if p[-1] == "kernel" else a
            want = tuple(flat_t[p].shape)
            if a.shape != want:
                mismatched.append((k, "/".join(p), want[::-1] if p[-1] == "kernel" else want, tuple(np.shape(state[k]))))
            else:
                out[p] = a
        missing = sorted(k for k in names if k not in state)
        unexpected = sorted(set(state) - set(names))
        if missing or unexpected or mismatched:
            raise IPAdapterCheckpointError(name, missing, unexpected, mismatched)
        return traverse_util.unflatten_dict(out)

    def load_checkpoint(self, built, path, target):
        """The released ``ip-adapter_*.bin`` / ``.safetensors`` (a file, or a folder with one)."""
        path = Path(path)
        files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.suffix in (".bin", ".pt", ".safetensors"))
        if len(files) != 1:
            raise FileNotFoundError(f"{path}: expected one IP-Adapter file (.bin / .safetensors), found "
                                    f"{[f.name for f in files]}")
        return self.load_state_dict(_released_state(files[0]), target, str(files[0]))


METHOD = IPAdapter()

"""timm checkpoints of RealCustom++'s two reference encoders, and :func:`load_vision_encoder`, the
one entry point for an encoder given as a Hugging Face folder or a timm file.

The released RealCustom++ code (``models/sigclip.py``, ``models/dino.py``) builds both encoders with
``timm.create_model(name, pretrained=True, num_classes=0, img_size=384)`` from local files:

  SigLIP  ``vit_so400m_patch14_siglip_384`` from open_clip's ``open_clip_pytorch_model.bin``
          (hub ``timm/ViT-SO400M-14-SigLIP-384``; the vision tower under ``visual.trunk.``, the text
          tower under ``text.``, plus ``logit_scale`` / ``logit_bias``); timm's own hub file
          (``timm/vit_so400m_patch14_siglip_384.webli``) holds the bare trunk keys.
  DINOv2  ``vit_large_patch14_reg4_dinov2.lvd142m`` from timm's ``pytorch_model.bin`` (or
          ``model.safetensors``).

timm layout (both): ``patch_embed.proj`` (a VALID strided convolution), ``pos_embed``,
``blocks.N.{norm1, attn.qkv (q, k, v packed along the output), attn.proj, norm2, mlp.fc1, mlp.fc2}``,
``norm`` (the final LayerNorm, on every token), LayerNorm eps 1e-6, and the MLP activation
``nn.GELU`` (erf: ``hidden_act="gelu"``; timm defines this SigLIP without the tanh approximation that
transformers' ``SiglipVisionModel`` uses, and we reproduce timm for a timm file). SigLIP has no class
token, a 27 x 27 ``pos_embed`` and the MAP head ``attn_pool.{latent, q, kv (k, v packed), proj,
norm, mlp}`` (our ``head.{probe, attention.in_proj_*, attention.out_proj, layernorm, mlp}``). DINOv2-L
reg4 adds ``cls_token``, ``reg_token`` (4) and layer scales ``blocks.N.ls1.gamma`` / ``ls2.gamma``;
timm builds it with ``no_embed_class=True``: its ``pos_embed`` is the 37 x 37 patch grid alone and
the class token's position was folded into ``cls_token`` when timm converted Meta's checkpoint
(whose ``pos_embed`` has 1 + 37 x 37 entries, ``register_tokens`` and ``mask_token``; that layout
loads too). There is no ``mask_token`` in the timm file (our ``use_mask_token=False``).

Position embeddings at 384 px: with ``img_size=384`` timm resamples DINOv2's stored 37 x 37 grid to
27 x 27 once, when it loads the file (``resample_abs_pos_embed``: ``F.interpolate(size=(27, 27),
mode="bicubic", antialias=True, align_corners=False)`` in float32). That is the kernel transformers'
``Dinov2WithRegistersModel`` applies at every forward, so the loaded model keeps the 37 x 37 table
(``image_size=518``, ``interpolate_antialias=True``) and resizes it per input size: at 384 px the
same numbers as timm's model. SigLIP's grid is already 27 x 27 at 384 px.

The architecture comes from the fixed table :data:`TIMM_MODELS` (heads cannot be read from shapes),
checked against the checkpoint's shapes; anything else is refused with the differences named.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from customjax.models.vit import (CLIP_VISION, DINOV2, SIGLIP_VISION, Dinov2Config, SiglipVisionConfig)
from customjax.weights import safetensors_io
from customjax.weights.convert import KeyedMismatchError, convert
from customjax.weights.folder import load_state_dict, read_config
from customjax.weights.loaders import load_pretrained, param_shapes

log = logging.getLogger(__name__)

KINDS = ("siglip", "dino", "clip")
SPECS = {"siglip": SIGLIP_VISION, "dino": DINOV2, "clip": CLIP_VISION}

# The timm encoders of the released RealCustom++ code: name -> (kind, config).
TIMM_MODELS: dict[str, tuple[str, Any]] = {
    "vit_so400m_patch14_siglip_384": ("siglip", SiglipVisionConfig(
        hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16, image_size=384,
        patch_size=14, hidden_act="gelu", layer_norm_eps=1e-6, vision_use_head=True)),
    "vit_large_patch14_reg4_dinov2": ("dino", Dinov2Config(
        hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, mlp_ratio=4, hidden_act="gelu",
        layer_norm_eps=1e-6, image_size=518, patch_size=14, qkv_bias=True, layerscale_value=1e-5,
        use_mask_token=False, num_register_tokens=4, interpolate_antialias=True)),
}
DEFAULT_TIMM = {kind: name for name, (kind, _) in TIMM_MODELS.items()}
# Files a timm / open_clip hub folder holds, in the order they are preferred.
TIMM_FILES = ("model.safetensors", "open_clip_model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
OPEN_CLIP_PREFIX = "visual.trunk."


class TimmWeightMismatchError(KeyedMismatchError):
    """A timm checkpoint whose keys or shapes do not fit the model, listed by timm key."""

    layout = "the timm layout of the model"


# ----------------------------------------------------------------------------------------------
# Files


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"vision encoder kind {kind!r}; choose one of {KINDS}")


def _declared_arch(folder: Path) -> str | None:
    """The timm architecture a hub folder declares: timm's ``config.json`` (``architecture``) or
    open_clip's ``open_clip_config.json`` (``model_cfg.vision_cfg.timm_model_name``); None if neither."""
    for fname, get in (("config.json", lambda d: d.get("architecture")),
                       ("open_clip_config.json",
                        lambda d: d.get("model_cfg", {}).get("vision_cfg", {}).get("timm_model_name"))):
        path = folder / fname
        if path.is_file():
            try:
                arch = get(json.loads(path.read_text()))
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{path}: cannot read the timm architecture ({e})") from None
            if arch:
                return str(arch).split(".")[0]   # drop a pretrained tag such as ".lvd142m"
    return None


def is_timm(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a timm / open_clip checkpoint (a file, or a folder without a transformers
    ``config.json``: one with ``model_type`` is a Hugging Face folder)."""
    path = Path(path)
    if path.is_file():
        return True
    cfg = path / "config.json"
    if not cfg.is_file():
        return True
    try:
        d = json.loads(cfg.read_text())
    except json.JSONDecodeError:
        return False   # read_config names the problem
    return "model_type" not in d and "architecture" in d


def timm_file(path: str | os.PathLike) -> Path:
    """The checkpoint file of a timm file path or folder (``TIMM_FILES`` in that order, else the one
    ``.safetensors`` / ``.bin`` / ``.pth`` / ``.pt`` file there)."""
    path = Path(path)
    if path.is_file():
        if path.suffix not in SUFFIXES:
            raise ValueError(f"{path}: not a checkpoint file (expected one of {SUFFIXES})")
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such file or folder")
    for fname in TIMM_FILES:
        if (path / fname).is_file():
            return path / fname
    found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in SUFFIXES)
    if len(found) != 1:
        raise FileNotFoundError(f"{path}: expected one of {TIMM_FILES} or a single checkpoint file, "
                                f"found {[p.name for p in found] or sorted(p.name for p in path.iterdir())}")
    return found[0]


def _read(path: Path) -> dict[str, Any]:
    """Tensors of one file: safetensors as numpy memory maps, torch files with ``weights_only=True``
    (memory-mapped where the format allows) as torch tensors, converted when used."""
    if path.suffix == ".safetensors":
        return safetensors_io.load_file(path)
    try:
        import torch
    except ImportError:
        raise ImportError(f"{path}: reading a PyTorch checkpoint needs torch (read with weights_only=True); "
                          "or convert it to safetensors") from None
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:   # the legacy (non-zip) format cannot be memory-mapped
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):   # training checkpoints nest the weights
        if isinstance(sd, dict) and isinstance(sd.get(key), dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ValueError(f"{path}: expected a state dict, found {type(sd).__name__}")
    return sd


def _np(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):   # a torch tensor
        import torch
        value = value.detach()
        return (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    return np.asarray(value)


def timm_state(raw: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The timm trunk's tensors of a checkpoint: a bare timm state dict as it is; open_clip's
    (``visual.trunk.*``) with the prefix removed and the rest skipped visibly (logged): the text
    tower, ``logit_scale`` / ``logit_bias``. Other ``visual.*`` tensors (a projection head) have no
    place in the model and are refused. A ``module.`` prefix (DDP saves) is removed."""
    if raw and all(k.startswith("module.") for k in raw):
        raw = {k[len("module."):]: v for k, v in raw.items()}
    if not any(k.startswith(OPEN_CLIP_PREFIX) for k in raw):
        return dict(raw)
    state = {k[len(OPEN_CLIP_PREFIX):]: v for k, v in raw.items() if k.startswith(OPEN_CLIP_PREFIX)}
    extra = sorted(k for k in raw if k.startswith("visual.") and not k.startswith(OPEN_CLIP_PREFIX))
    if extra:
        raise TimmWeightMismatchError(name, [], extra, [])
    skipped = sorted(k for k in raw if not k.startswith("visual."))
    log.info("%s: open_clip checkpoint: the vision trunk (%d tensors) is used; %d tensors of the text tower "
             "and logit scale / bias are skipped: %s", name, len(state), len(skipped), skipped[:8])
    return state


# ----------------------------------------------------------------------------------------------
# Architecture and keys


def _family(state: Mapping[str, Any], name: str) -> str:
    if "patch_embed.proj.weight" not in state or "pos_embed" not in state:
        raise ValueError(f"{name}: not a timm ViT checkpoint (no 'patch_embed.proj.weight' / 'pos_embed'; "
                         f"keys like {sorted(state)[:6]})")
    return "dino" if "cls_token" in state else "siglip"


def _registers(state: Mapping[str, Any]) -> tuple[int, str | None]:
    for key in ("reg_token", "register_tokens"):   # timm, Meta's original
        if key in state:
            return int(state[key].shape[1]), key
    return 0, None


def _describe(kind: str, c: Any) -> str:
    mlp = c.intermediate_size if kind == "siglip" else c.mlp_hidden
    regs = f", {c.num_register_tokens} registers" if kind == "dino" else ""
    g = c.image_size // c.patch_size
    return (f"hidden {c.hidden_size}, {c.num_hidden_layers} blocks, MLP {mlp}, patch {c.patch_size}, "
            f"{g}x{g} positions{regs}")


def timm_config(state: Mapping[str, Any], kind: str, name: str, arch: str | None = None,
                config: Any = None) -> Any:
    """The config of a timm checkpoint: ``config`` if given (tests: tiny models of the same family),
    else the table's for ``arch`` (default: the released encoder of ``kind``), checked against the
    checkpoint's shapes: hidden size, block count, MLP width, patch, position grid, register tokens."""
    _check_kind(kind)
    if kind == "clip":
        raise ValueError(f"{name}: no timm CLIP is known here; give a Hugging Face CLIPVisionModel folder")
    family = _family(state, name)
    if family != kind:
        what = {"dino": "DINOv2 (it has a cls_token)", "siglip": "SigLIP (no cls_token)"}[family]
        raise ValueError(f"{name}: a timm {what} checkpoint, asked to load as {kind!r}")
    if config is None:
        arch = arch or DEFAULT_TIMM[kind]
        if arch not in TIMM_MODELS:
            raise ValueError(f"{name}: timm architecture {arch!r} is not one this loader knows "
                             f"({sorted(TIMM_MODELS)}); convert it to a Hugging Face folder")
        if TIMM_MODELS[arch][0] != kind:
            raise ValueError(f"{name}: timm architecture {arch!r} is a {TIMM_MODELS[arch][0]!r} encoder, "
                             f"asked to load as {kind!r}")
        config = TIMM_MODELS[arch][1]
    c = config
    n_ckpt, reg_key = _registers(state)
    if kind == "dino":
        if n_ckpt != c.num_register_tokens:
            where = f" ({reg_key} {tuple(state[reg_key].shape)})" if reg_key else ""
            raise ValueError(f"{name}: the checkpoint has {n_ckpt} register tokens{where} and the config has "
                             f"{c.num_register_tokens}; a DINOv2 checkpoint loads only into a model with as many "
                             "register tokens (timm: vit_large_patch14_reg4_dinov2 has 4)")
        c = dataclasses.replace(c, use_mask_token="mask_token" in state)
    w = state["patch_embed.proj.weight"]
    blocks = {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k))}
    fc1 = state.get("blocks.0.mlp.fc1.weight")
    g = c.image_size // c.patch_size
    pos = state["pos_embed"].shape[1]
    found = dict(hidden=w.shape[0], blocks=len(blocks), mlp=None if fc1 is None else fc1.shape[0], patch=w.shape[-1],
                 positions=pos)
    want = dict(hidden=c.hidden_size, blocks=c.num_hidden_layers,
                mlp=c.intermediate_size if kind == "siglip" else c.mlp_hidden, patch=c.patch_size,
                positions=(g * g, g * g + 1) if kind == "dino" else (g * g,))
    bad = [f"{k} {found[k]} (expected {' or '.join(map(str, v)) if isinstance(v, tuple) else v})"
           for k, v in want.items() if (found[k] not in v if isinstance(v, tuple) else found[k] != v)]
    if bad:
        which = f"timm {arch}" if arch else "the given config"
        raise ValueError(f"{name}: the checkpoint's {', '.join(bad)} do not fit {which} "
                         f"({_describe(kind, c)}); only {sorted(TIMM_MODELS)} are known as timm files, other "
                         "encoders load from Hugging Face folders")
    return c


def _expected(kind: str, c: Any, state: Mapping[str, Any]) -> dict[str, tuple]:
    """timm key -> shape for config ``c`` (DINOv2: the timm or the Meta layout, as in ``state``)."""
    d, ch, p = c.hidden_size, c.num_channels, c.patch_size
    mlp = c.intermediate_size if kind == "siglip" else c.mlp_hidden
    g2 = (c.image_size // p) ** 2
    out = {"patch_embed.proj.weight": (d, ch, p, p), "patch_embed.proj.bias": (d,),
           "norm.weight": (d,), "norm.bias": (d,)}
    lin = lambda key, o, i: out.update({f"{key}.weight": (o, i), f"{key}.bias": (o,)})
    for j in range(c.num_hidden_layers):
        b = f"blocks.{j}"
        out.update({f"{b}.{n}.{leaf}": (d,) for n in ("norm1", "norm2") for leaf in ("weight", "bias")})
        lin(f"{b}.attn.qkv", 3 * d, d)
        lin(f"{b}.attn.proj", d, d)
        lin(f"{b}.mlp.fc1", mlp, d)
        lin(f"{b}.mlp.fc2", d, mlp)
        if kind == "dino":
            out.update({f"{b}.ls1.gamma": (d,), f"{b}.ls2.gamma": (d,)})
            if not c.qkv_bias:
                del out[f"{b}.attn.qkv.bias"]
    if kind == "siglip":
        out["pos_embed"] = (1, g2, d)
        if c.vision_use_head:
            out.update({"attn_pool.latent": (1, 1, d), "attn_pool.norm.weight": (d,), "attn_pool.norm.bias": (d,)})
            lin("attn_pool.q", d, d)
            lin("attn_pool.kv", 2 * d, d)
            lin("attn_pool.proj", d, d)
            lin("attn_pool.mlp.fc1", mlp, d)
            lin("attn_pool.mlp.fc2", d, mlp)
    else:
        meta = "register_tokens" in state or "mask_token" in state
        out.update({"cls_token": (1, 1, d), "pos_embed": (1, g2 + meta, d)})
        if c.num_register_tokens:
            out["register_tokens" if meta else "reg_token"] = (1, c.num_register_tokens, d)
        if c.use_mask_token:
            out["mask_token"] = (1, d)
    return out


def _to_ours(kind: str, c: Any, state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """timm keys -> our (transformers-style) keys and layouts: q / k / v unpacked, the DINOv2 class
    position restored (zero: timm folded it into ``cls_token``), SigLIP's q + kv packed as torch's
    ``MultiheadAttention`` ``in_proj``."""
    d = c.hidden_size
    out: dict[str, np.ndarray] = {}
    if kind == "siglip":
        pre = "vision_model."
        layers, attn, out_name, n1, n2 = pre + "encoder.layers", "self_attn", "out_proj", "layer_norm1", "layer_norm2"
        final = pre + "post_layernorm"
        out[pre + "embeddings.patch_embedding.weight"] = _np(state["patch_embed.proj.weight"])
        out[pre + "embeddings.patch_embedding.bias"] = _np(state["patch_embed.proj.bias"])
        out[pre + "embeddings.position_embedding.weight"] = _np(state["pos_embed"])[0]
        if c.vision_use_head:
            h = pre + "head."
            out[h + "probe"] = _np(state["attn_pool.latent"])
            for leaf in ("weight", "bias"):
                out[f"{h}attention.in_proj_{leaf}"] = np.concatenate(
                    [_np(state[f"attn_pool.q.{leaf}"]), _np(state[f"attn_pool.kv.{leaf}"])])
                out[f"{h}attention.out_proj.{leaf}"] = _np(state[f"attn_pool.proj.{leaf}"])
                out[f"{h}layernorm.{leaf}"] = _np(state[f"attn_pool.norm.{leaf}"])
                for fc in ("fc1", "fc2"):
                    out[f"{h}mlp.{fc}.{leaf}"] = _np(state[f"attn_pool.mlp.{fc}.{leaf}"])
    else:
        layers, attn, out_name, n1, n2, final = "encoder.layer", "attention", "o_proj", "norm1", "norm2", "layernorm"
        e = "embeddings."
        out[e + "patch_embeddings.projection.weight"] = _np(state["patch_embed.proj.weight"])
        out[e + "patch_embeddings.projection.bias"] = _np(state["patch_embed.proj.bias"])
        cls, pos = _np(state["cls_token"]), _np(state["pos_embed"])
        if pos.shape[1] == (c.image_size // c.patch_size) ** 2:   # timm: no class position
            pos = np.concatenate([np.zeros((1, 1, d), pos.dtype), pos], axis=1)
        out[e + "cls_token"], out[e + "position_embeddings"] = cls, pos
        n_reg, reg_key = _registers(state)
        if n_reg:
            out[e + "register_tokens"] = _np(state[reg_key])
        if c.use_mask_token:
            out[e + "mask_token"] = _np(state["mask_token"])
    for leaf in ("weight", "bias"):
        out[f"{final}.{leaf}"] = _np(state[f"norm.{leaf}"])
    for j in range(c.num_hidden_layers):
        b, o = f"blocks.{j}.", f"{layers}.{j}."
        for leaf in ("weight", "bias"):
            if f"{b}attn.qkv.{leaf}" in state:
                for name, part in zip(("q_proj", "k_proj", "v_proj"), np.split(_np(state[f"{b}attn.qkv.{leaf}"]), 3)):
                    out[f"{o}{attn}.{name}.{leaf}"] = part
            out[f"{o}{attn}.{out_name}.{leaf}"] = _np(state[f"{b}attn.proj.{leaf}"])
            out[f"{o}{n1}.{leaf}"] = _np(state[f"{b}norm1.{leaf}"])
            out[f"{o}{n2}.{leaf}"] = _np(state[f"{b}norm2.{leaf}"])
            for fc in ("fc1", "fc2"):
                out[f"{o}mlp.{fc}.{leaf}"] = _np(state[f"{b}mlp.{fc}.{leaf}"])
        if kind == "dino":
            out[f"{o}layer_scale1.lambda1"] = _np(state[f"{b}ls1.gamma"])
            out[f"{o}layer_scale2.lambda1"] = _np(state[f"{b}ls2.gamma"])
    return out


def convert_timm(state: Mapping[str, Any], kind: str, config: Any, name: str = "timm checkpoint") -> dict:
    """Our parameter tree (numpy, float32) of ``SiglipVisionModel`` / ``Dinov2Model`` from a timm
    state dict (after :func:`timm_state`); strict: every key used (a classifier ``head.*``, which
    timm drops with ``num_classes=0``, is skipped and logged), every parameter filled, every shape
    checked, errors naming the timm keys."""
    state = dict(state)
    head = sorted(k for k in state if k.split(".")[0] == "head")
    if head:
        log.info("%s: classifier tensors skipped (timm drops them with num_classes=0): %s", name, head)
        state = {k: v for k, v in state.items() if k not in head}
    want = _expected(kind, config, state)
    missing = sorted(set(want) - set(state))
    unexpected = sorted(set(state) - set(want))
    mismatched = [(k, k, want[k], tuple(state[k].shape)) for k in sorted(set(want) & set(state))
                  if tuple(state[k].shape) != want[k]]
    if missing or unexpected or mismatched:
        raise TimmWeightMismatchError(name, missing, unexpected, mismatched)
    spec = SPECS[kind]
    return convert(_to_ours(kind, config, state), param_shapes(spec, config), name=name)


# ----------------------------------------------------------------------------------------------
# Entry points


def load_timm(path: str | os.PathLike, kind: str, *, config: Any = None, dtype: Any = jnp.float32
              ) -> tuple[Any, Any]:
    """(module, params) from a timm / open_clip checkpoint file, or a folder holding one; the
    architecture from :data:`TIMM_MODELS` (the folder's declared one, else the released encoder of
    ``kind``) unless ``config`` is given. Parameters are float32; ``dtype`` is the compute dtype."""
    _check_kind(kind)
    path = Path(path)
    file = timm_file(path)
    arch = _declared_arch(path) if path.is_dir() else None
    name = str(file)
    state = timm_state(_read(file), name)
    cfg = timm_config(state, kind, name, arch, config)
    params = convert_timm(state, kind, cfg, name)
    module = SPECS[kind].build(cfg, dtype)
    return module, jax.tree_util.tree_map(jnp.asarray, params)


def _load_dinov2_folder(folder: str | os.PathLike, dtype: Any) -> tuple[Any, Any]:
    """A Hugging Face DINOv2 folder; its register tokens must agree with its config."""
    d = read_config(folder)
    config = DINOV2.config_from_dict(d)
    state = load_state_dict(folder)
    key = "embeddings.register_tokens"
    n_ckpt = int(state[key].shape[1]) if key in state else 0
    if n_ckpt != config.num_register_tokens:
        where = f" ({key} {tuple(state[key].shape)})" if key in state else ""
        raise ValueError(f"{folder}: the checkpoint has {n_ckpt} register tokens{where} and the config "
                         f"(model_type {d.get('model_type', 'dinov2')!r}) has {config.num_register_tokens}; "
                         "DINOv2 with registers needs model_type 'dinov2_with_registers' and "
                         "num_register_tokens matching the weights")
    params = convert(state, param_shapes(DINOV2, config), name=str(folder), rename=DINOV2.rename, skip=DINOV2.skip)
    return DINOV2.build(config, dtype), jax.tree_util.tree_map(jnp.asarray, params)


def load_vision_encoder(path: str | os.PathLike, kind: str, dtype: Any = jnp.float32) -> tuple[Any, Any]:
    """(module, params) of a reference image encoder. ``kind``: "siglip" | "dino" | "clip".

    ``path``: a Hugging Face folder (``config.json`` with ``model_type`` + weights; loaded by
    :func:`customjax.weights.loaders.load_pretrained` with ``SIGLIP_VISION`` / ``DINOV2`` /
    ``CLIP_VISION``), or a timm / open_clip checkpoint file or hub folder (:func:`load_timm`; SigLIP
    and DINOv2 only). ``module.config`` is the architecture; parameters are float32, ``dtype`` is
    the compute dtype. A DINOv2 whose weights and config disagree on register tokens is refused."""
    _check_kind(kind)
    if is_timm(path):
        return load_timm(path, kind, dtype=dtype)
    if kind == "dino":
        return _load_dinov2_folder(path, dtype)
    module, params, _ = load_pretrained(path, SPECS[kind], dtype=dtype)
    return module, params

"""Writes the pretrained ShapeWorld stack as a diffusers Stable Diffusion folder that
:func:`customjax.pipeline.load_stable_diffusion` (and diffusers / transformers) load like SD-1.5:

    model_index.json, scheduler/, tokenizer/
    unet/, vae/                      diffusers config.json + diffusion_pytorch_model.safetensors
    text_encoder/                    transformers CLIPTextModel (the CLIP text tower, or the one trained
                                     with the UNet: ``text_p``)
    image_encoder/                   transformers CLIPVisionModelWithProjection (the vision tower)
    clip/                            transformers CLIPModel (both towers, projections, logit_scale)

Weights are stored in float16 (a few MB in all); loading makes them float32. The transformers
components' ``config.json`` say so (``dtype`` / ``torch_dtype`` ``"float32"``): transformers 5 loads a
model in its config's dtype, else (``from_pretrained`` without ``dtype``, as diffusers' pipeline
loading calls it) in its weights' dtype, which would put float16 encoders beside diffusers' float32
UNet and VAE. :func:`fix_transformers_files` brings a folder written before that up to date.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np

from customjax.weights.convert import to_torch_state
from customjax.weights.safetensors_io import save_file
from customjax.zoo import clip_text_config_dict, unet_config_dict, vae_config_dict

STORE_DTYPE = np.float16
# the dtype transformers loads the encoders in (an exact cast of the stored float16 values); "dtype" for
# transformers >= 4.56, "torch_dtype" for older versions (both read by transformers 5)
LOAD_DTYPE = {"dtype": "float32", "torch_dtype": "float32"}


def _save(folder: Path, config: dict, state: dict, weights: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: np.asarray(v, STORE_DTYPE) for k, v in state.items()}, folder / weights)


def _without(tree: dict, name: str) -> dict:
    return {k: v for k, v in tree.items() if k != name}


def vision_config_dict(c) -> dict:
    d = dataclasses.asdict(c)
    proj = d.pop("with_projection")
    return dict(d, model_type="clip_vision_model",
                architectures=["CLIPVisionModelWithProjection" if proj else "CLIPVisionModel"])


def transformers_config(d: dict) -> dict:
    """A transformers ``config.json`` dict declaring :data:`LOAD_DTYPE` (nested tower configs too, so that
    a tower class loaded from the two-tower folder is float32 as well)."""
    out = dict(d, **LOAD_DTYPE)
    for key in ("text_config", "vision_config"):
        if isinstance(out.get(key), dict):
            out[key] = dict(out[key], **LOAD_DTYPE)
    return out


def clip_config_dict(text_cfg, vision_cfg) -> dict:
    """The transformers ``CLIPModel`` config of the two towers (``text_cfg`` with its projection)."""
    text_plain = dataclasses.replace(text_cfg, with_projection=False)
    text_d = _without(clip_text_config_dict(text_plain), "architectures")
    return transformers_config(dict(model_type="clip", architectures=["CLIPModel"], projection_dim=text_cfg.projection_dim,
                                    text_config=dict(text_d, projection_dim=text_cfg.projection_dim),
                                    vision_config=_without(vision_config_dict(vision_cfg), "architectures")))


def fix_transformers_files(folder) -> list[str]:
    """Brings a folder written before the dtype record and the scalar ``logit_scale`` up to date in place:
    the transformers components' configs get :data:`LOAD_DTYPE`, ``clip/``'s ``logit_scale`` is stored
    with shape ``[]`` (transformers ``CLIPModel``'s; earlier files hold ``[1]``). Weight values and their
    storage dtype are unchanged. Returns what was changed (empty when the folder was up to date)."""
    from customjax.weights.safetensors_io import load_file, read_metadata

    folder, changed = Path(folder), []
    for name in ("text_encoder", "image_encoder", "clip"):
        path = folder / name / "config.json"
        if not path.is_file():
            continue
        d = json.loads(path.read_text())
        new = transformers_config(d)
        if new != d:
            path.write_text(json.dumps(new, indent=2))
            changed.append(f"{name}/config.json")
    path = folder / "clip" / "model.safetensors"
    if path.is_file():
        state = load_file(path)
        if "logit_scale" in state and state["logit_scale"].shape != ():
            state = {k: np.array(v) for k, v in state.items()}
            state["logit_scale"] = state["logit_scale"].reshape(())
            save_file(state, path, read_metadata(path) or None)
            changed.append("clip/model.safetensors")
    return changed


def write_folder(out, *, scheduler: dict, tokenizer_dir, unet_cfg, unet_p, vae_cfg, vae_p, text_cfg, vision_cfg, clip_p,
                 info: dict, text_p: dict | None = None) -> Path:
    """Writes the folder (replacing ``out``); ``info`` (command, seed, settings, figures) goes to
    ``out/shapeworld.json``. ``text_p``: the pipeline's text encoder if not the CLIP's text tower."""
    out = Path(out)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shutil.copytree(tokenizer_dir, out / "tokenizer")
    _save(out / "unet", unet_config_dict(unet_cfg), to_torch_state(unet_p), "diffusion_pytorch_model.safetensors")
    _save(out / "vae", vae_config_dict(vae_cfg), to_torch_state(vae_p), "diffusion_pytorch_model.safetensors")
    text_plain = dataclasses.replace(text_cfg, with_projection=False)
    _save(out / "text_encoder", transformers_config(clip_text_config_dict(text_plain)),
          to_torch_state(_without(clip_p["text"] if text_p is None else text_p, "text_projection")), "model.safetensors")
    _save(out / "image_encoder", transformers_config(vision_config_dict(vision_cfg)), to_torch_state(clip_p["vision"]),
          "model.safetensors")
    # a scalar, as transformers' CLIPModel has it (a parent folder written before may hold shape [1])
    full = {**to_torch_state(clip_p["text"]), **to_torch_state(clip_p["vision"]),
            "logit_scale": np.asarray(clip_p["logit_scale"]).reshape(())}
    _save(out / "clip", clip_config_dict(text_cfg, vision_cfg), full, "model.safetensors")
    (out / "scheduler").mkdir()
    (out / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler, indent=2))
    index = {"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
             "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
             "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
             "image_encoder": ["transformers", "CLIPVisionModelWithProjection"],
             "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}
    (out / "model_index.json").write_text(json.dumps(index, indent=2))
    (out / "shapeworld.json").write_text(json.dumps(info, indent=2))
    return out

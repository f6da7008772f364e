"""Writes the pretrained ShapeWorld stack as a diffusers Stable Diffusion folder that
:func:`customjax.pipeline.load_stable_diffusion` (and diffusers / transformers) load like SD-1.5:

    model_index.json, scheduler/, tokenizer/
    unet/, vae/                      diffusers config.json + diffusion_pytorch_model.safetensors
    text_encoder/                    transformers CLIPTextModel (the CLIP text tower, or the one trained
                                     with the UNet: ``text_p``)
    image_encoder/                   transformers CLIPVisionModelWithProjection (the vision tower)
    clip/                            transformers CLIPModel (both towers, projections, logit_scale)

Weights are stored in float16 (a few MB in all); loading makes them float32.
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
    _save(out / "text_encoder", clip_text_config_dict(text_plain), to_torch_state(_without(clip_p["text"] if text_p is None else text_p, "text_projection")),
          "model.safetensors")
    _save(out / "image_encoder", vision_config_dict(vision_cfg), to_torch_state(clip_p["vision"]), "model.safetensors")
    full = {**to_torch_state(clip_p["text"]), **to_torch_state(clip_p["vision"]),
            "logit_scale": np.asarray(clip_p["logit_scale"])}
    text_d = _without(clip_text_config_dict(text_plain), "architectures")
    _save(out / "clip", dict(model_type="clip", architectures=["CLIPModel"], projection_dim=text_cfg.projection_dim,
                             text_config=dict(text_d, projection_dim=text_cfg.projection_dim),
                             vision_config=_without(vision_config_dict(vision_cfg), "architectures")),
          full, "model.safetensors")
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

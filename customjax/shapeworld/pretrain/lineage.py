"""Continuing a pretrained ShapeWorld base (``config.init``): its tokenizer, VAE and CLIP are kept
as they are and its UNet trains on from its weights, the way a released base model is trained
further. The new record (``shapeworld.json``) carries the parent's record under ``parent`` and the
SHA-256 of the UNet weights it started from, so a chain of continuations stays traceable to the
command that made its first link (:func:`root_record`)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np

# What a continuation must share with its parent: the data, the frozen stages, and the UNet's
# architecture and noise schedule (the training length, learning rate and EMA may differ).
SHARED_SECTIONS = ("tokenizer", "vae", "clip")
SHARED_TOP = ("seed", "pool", "size")
SHARED_UNET = ("block_out_channels", "layers_per_block", "heads", "norm_num_groups", "down_block_types",
               "up_block_types", "prediction_type", "beta_schedule", "timestep_spacing")
UNET_WEIGHTS = "unet/diffusion_pytorch_model.safetensors"


@dataclasses.dataclass
class Parent:
    folder: Path
    record: dict            # the parent's shapeworld.json
    unet_sha256: str
    vae_cfg: Any            # with the parent's latent scaling factor
    vae_p: dict
    clip_p: dict            # {"text", "vision", "logit_scale"}, as the CLIP stage returns them
    unet_p: dict


def root_record(info: dict) -> dict:
    """The record of the first link of a chain of continuations (the run made from nothing)."""
    while "parent" in info:
        info = info["parent"]
    return info


def _norm(v):
    return json.loads(json.dumps(v))    # tuples and lists compare equal after a JSON round trip


def check_compatible(c, record: dict, where: str) -> None:
    """Raises ValueError naming the first config key in which ``c`` differs from the parent's."""
    theirs = record["config"]
    pairs = [(k, c.get(k), theirs.get(k)) for k in SHARED_TOP]
    pairs += [(f"{s}.{k}", v, theirs.get(s, {}).get(k)) for s in SHARED_SECTIONS for k, v in c[s].items()]
    pairs += [(f"unet.{k}", c.unet.get(k), theirs["unet"].get(k)) for k in SHARED_UNET]
    for key, ours, parent in pairs:
        if _norm(ours) != _norm(parent):
            raise ValueError(f"config.{key} is {ours!r} but {where} was trained with {parent!r}: a continuation "
                             "keeps its parent's data, tokenizer, VAE, CLIP and UNet architecture")
    if c.unet.get("train_text", False) or theirs["unet"].get("train_text", False):
        raise ValueError(f"config.unet.train_text: continuing {where} with a text tower trained with the UNet "
                         "is not supported")


def load_parent(c) -> Parent:
    """The folder ``c.init`` (a :mod:`customjax.shapeworld.pretrain` output), checked against ``c``."""
    from customjax.models.clip import load_clip
    from customjax.pipeline import load_stable_diffusion
    from customjax.weights.safetensors_io import load_file

    folder = Path(c.init)
    rec_path = folder / "shapeworld.json"
    if not rec_path.is_file():
        raise FileNotFoundError(f"config.init={c.init!r}: {rec_path} is missing; init takes a folder written by "
                                "python -m customjax.shapeworld.pretrain")
    record = json.loads(rec_path.read_text())
    check_compatible(c, record, str(rec_path))
    pipe, params = load_stable_diffusion(folder)
    _, clip_p = load_clip(folder / "clip")
    clip_p["logit_scale"] = np.asarray(load_file(folder / "clip" / "model.safetensors")["logit_scale"], np.float32)
    sha = hashlib.sha256((folder / UNET_WEIGHTS).read_bytes()).hexdigest()
    return Parent(folder, record, sha, pipe.vae.config, params["vae"], clip_p, params["unet"])


def copy_tokenizer(parent: Parent, dest: Path) -> Path:
    if dest.exists():
        shutil.rmtree(dest)
    shutil.copytree(parent.folder / "tokenizer", dest)
    return dest


def inherited_history(parent: Parent, stage: str) -> list[dict]:
    """The parent's logged curve of a kept stage, in the form the stage loops log."""
    rec = parent.record
    curve = [{"step": s, "loss": l} for s, l in rec["loss_curves"][stage]]
    curve[-1]["seconds"] = rec["stage_seconds"][stage]
    return curve

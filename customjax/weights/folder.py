"""Finding and reading the weights and config of a diffusers or Hugging Face model folder.

Handles single files, sharded checkpoints with an ``*.index.json`` weight map, and variants
(``diffusion_pytorch_model.fp16.safetensors``). PyTorch ``.bin`` files are read only when torch
is installed, and then with ``weights_only=True``.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np

from customjax.weights import safetensors_io

log = logging.getLogger(__name__)

STEMS = ("diffusion_pytorch_model", "model")


class WeightsNotFoundError(FileNotFoundError):
    pass


def read_config(folder: str | os.PathLike) -> dict:
    """The folder's ``config.json`` as a dict."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise WeightsNotFoundError(f"{folder}: no config.json (is this a model folder?)")
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: invalid JSON ({e})") from None


def _weight_files(folder: Path, variant: str | None) -> list[Path]:
    suffix = f".{variant}" if variant else ""
    for stem in STEMS:
        for ext in ("safetensors", "bin"):
            single = folder / f"{stem}{suffix}.{ext}"
            if single.is_file():
                return [single]
            index = folder / f"{stem}{suffix}.{ext}.index.json"
            if index.is_file():
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
                files = sorted({folder / v for v in weight_map.values()})
                missing = [str(p) for p in files if not p.is_file()]
                if missing:
                    raise WeightsNotFoundError(f"{index}: shard files missing: {missing}")
                return files
    return []


def weight_files(folder: str | os.PathLike, variant: str | None = None) -> list[Path]:
    """The checkpoint files of a model folder, safetensors preferred over .bin."""
    folder = Path(folder)
    if not folder.is_dir():
        raise WeightsNotFoundError(f"{folder}: not a directory")
    files = _weight_files(folder, variant)
    if not files and variant is None:
        # Only a variant present (e.g. just the fp16 files): take it, and say so.
        for cand in sorted(folder.glob("*.*.safetensors")):
            parts = cand.name.split(".")
            if parts[0] in STEMS and len(parts) == 3:
                log.info("%s: using variant %r, the only weights in the folder", folder, parts[1])
                files = _weight_files(folder, parts[1])
                break
    if not files:
        listing = sorted(p.name for p in folder.iterdir())
        raise WeightsNotFoundError(
            f"{folder}: no weights found (looked for {'/'.join(STEMS)}"
            f"{'.' + variant if variant else ''}.safetensors or .bin, single or indexed); "
            f"folder holds {listing}")
    return files


def _load_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:
        raise WeightsNotFoundError(
            f"{path}: PyTorch .bin checkpoints need torch; convert it to safetensors or install "
            "torch (it is then read with weights_only=True)") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: v.float().numpy() if v.dtype == torch.bfloat16 else v.numpy() for k, v in sd.items()}


def load_state_dict(folder: str | os.PathLike, variant: str | None = None) -> dict[str, np.ndarray]:
    """All tensors of a model folder, keyed by their PyTorch names."""
    out: dict[str, np.ndarray] = {}
    for path in weight_files(folder, variant):
        part = safetensors_io.load_file(path) if path.suffix == ".safetensors" else _load_bin(path)
        dup = out.keys() & part.keys()
        if dup:
            raise ValueError(f"{path}: tensors also found in another shard: {sorted(dup)[:5]}")
        out.update(part)
    return out

"""The base model a config names (``config.model``): a diffusers folder, or a random pipeline
(tests, benchmarks), with real or abstract parameters; and its first tokenizer alone, to check
prompts before anything loads. Shared by the methods, the data tools and the CLIs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import jax.numpy as jnp

log = logging.getLogger(__name__)


def base_pipeline(config) -> tuple[Any, dict]:
    """(pipeline, params) of the base model: the diffusers folder ``config.model.path``, or a random
    ``config.model.random`` pipeline of scale ``config.model.random_scale`` when the path is empty.
    ``config.model.abstract``: parameters as ``jax.ShapeDtypeStruct`` from the folder's config files
    alone (nothing allocated, no weights read). A missing folder raises FileNotFoundError with
    ``config.model.missing_hint`` (how to make it).

    A path to a ``.safetensors`` file is a single-file LDM checkpoint
    (:func:`customjax.weights.single_file.load_single_file`): ``config.model.single_file_config``
    names its configs, a diffusers folder of the same model or a variant "sd15" | "sd21" | "sdxl"
    (empty: the variant of the file's layout), and ``config.model.single_file_tokenizer`` a folder
    with ``tokenizer/`` (+ ``tokenizer_2/``), needed when the configs have none (every variant)."""
    from customjax.pipeline import load_stable_diffusion

    m = config.model
    dtype = jnp.dtype(m.dtype)
    abstract = bool(m.get("abstract", False))
    if m.path:
        try:
            if Path(m.path).suffix == ".safetensors":
                from customjax.weights.single_file import load_single_file
                return load_single_file(m.path, configs=m.get("single_file_config", "") or None,
                                        tokenizer=m.get("single_file_tokenizer", "") or None, dtype=dtype,
                                        abstract=abstract)
            if abstract:
                return load_stable_diffusion(m.path, dtype=dtype, abstract=True)
            return load_stable_diffusion(m.path, dtype=dtype)
        except FileNotFoundError as e:
            hint = m.get("missing_hint", "")
            if not hint:
                raise
            raise FileNotFoundError(f"config.model.path: {e}; {hint}") from e
    if abstract:
        raise ValueError("config.model.abstract builds from config files: set config.model.path to a folder "
                         "of them (customjax/weights/published_configs/sd15, for example)")
    from customjax.zoo import random_pipeline

    scale = m.get("random_scale", "tiny")
    log.warning("config.model.path is empty: using a random %s %s pipeline", scale, m.random)
    return random_pipeline(m.random, scale, seed=config.seed, std=0.1 if scale == "tiny" else 0.02, dtype=dtype)


# Config keys that name local files or folders, checked before anything is built.
PATH_KEYS = ("model.path", "encoders.siglip", "encoders.dino", "encoders.clip", "data.text_image", "data.multiview",
             "data.latents")


def check_config_paths(config, keys=PATH_KEYS) -> None:
    """Every non-empty path the config names exists (a glob must match; a URL is left to its reader),
    or a FileNotFoundError naming the key: before minutes of model building."""
    import glob

    for key in keys:
        section, _, leaf = key.partition(".")
        value = config.get(section, {}).get(leaf, "") if leaf else config.get(section, "")
        for p in ([value] if isinstance(value, str) else list(value or [])):
            if not p or "://" in p:
                continue
            if not (Path(p).exists() or glob.glob(p)):
                raise FileNotFoundError(f"config.{key}={p!r}: no such file or folder")


def first_tokenizer(config):
    """The pipeline's (first) tokenizer alone, cheaply, to check prompts before anything loads."""
    import tempfile

    from customjax.tokenizer import load_tokenizer
    from customjax.tokenizer import write_char_tokenizer

    m = config.model
    if m.path and Path(m.path).suffix == ".safetensors":        # a single-file checkpoint
        from customjax.weights.single_file import tokenizer_paths

        return load_tokenizer(tokenizer_paths(m.path, configs=m.get("single_file_config", "") or None,
                                              tokenizer=m.get("single_file_tokenizer", "") or None)[0])
    folder = Path(m.path) / "tokenizer" if m.path else None
    if folder is None or (config.model.get("abstract", False) and not folder.is_dir()):   # a folder of configs
        folder = Path(tempfile.mkdtemp(prefix="customjax-tok-"))
        write_char_tokenizer(folder)
    return load_tokenizer(folder)

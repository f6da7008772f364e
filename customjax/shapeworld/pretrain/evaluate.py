"""Text-to-image quality of a ShapeWorld base model on held-out prompts (``eval_scenes``: training
subjects in (category, background, position) combinations never seen in training), measured
exactly with :mod:`customjax.shapeworld.metrics` and with the model's own CLIP (CLIP-T)."""

from __future__ import annotations

import os
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from tqdm import tqdm

from customjax.shapeworld import world as sw
from customjax.images import grid, save_png
from customjax.metrics.clip_score import load_clip_scorer
from customjax.shapeworld.metrics import measure, summarise
from customjax.pipeline import load_stable_diffusion
from customjax.sampling.common import seed_latents
from customjax.sampling.t2i import txt2img

HEADLINE = ("background_correct", "category_correct", "position_correct", "size_correct", "color_correct", "clip_t")


def generate(pipe, params, prompts: list[str], *, steps: int, guidance: float, batch: int,
             seed: int = 0, sampler: str = "ddim") -> np.ndarray:
    """uint8 images for ``prompts``; image ``i`` starts from the noise of seed ``seed + i``."""
    s, c = pipe.unet.config.sample_size, pipe.unet.config.in_channels
    out = []
    for i in tqdm(range(0, len(prompts), batch), desc="generate", unit="batch"):
        chunk = prompts[i:i + batch]
        n = len(chunk)
        chunk = chunk + [chunk[-1]] * (batch - n)        # one compiled batch size
        lat = seed_latents(list(range(seed + i, seed + i + batch)), (s, s, c))
        img = txt2img(pipe, params, chunk, None, steps=steps, guidance=guidance, sampler=sampler,
                      latents=jnp.asarray(lat))
        out.append(np.asarray(img[:n]))
    return np.round(np.concatenate(out) * 255).astype(np.uint8)


def evaluate(folder: str | os.PathLike, *, prompts: int, steps: int, guidance: float, batch: int, seed: int = 0,
             sampler: str = "ddim", grid_out: str | os.PathLike | None = None, grid_count: int = 16) -> dict:
    """{"summary": {metric: {mean, lo, hi, n}, "category_correct_by_category": {category: {mean, lo, hi,
    n}}}, "settings": ...}; writes a sample grid if asked."""
    folder = Path(folder)
    pipe, params = load_stable_diffusion(folder)
    size = pipe.unet.config.sample_size * pipe.vae_scale
    scenes = sw.eval_scenes(prompts, seed, size)
    texts = [sw.prompt(s) for s in scenes]
    images = generate(pipe, params, texts, steps=steps, guidance=guidance, batch=batch, seed=seed, sampler=sampler)
    results = [measure(im, sc) for im, sc in zip(images, scenes)]
    scorer = load_clip_scorer(folder / "clip", folder / "tokenizer")
    for r, t in zip(results, scorer.clip_t(images, texts)):
        r["clip_t"] = float(t)
    gt = np.stack([sw.render(s, size)[0] for s in scenes])
    summary = summarise(results)
    summary["clip_t_ground_truth"] = summarise([{"v": float(v)} for v in scorer.clip_t(gt, texts)])["v"]
    by_category = {}    # category correct by the prompt's category (each evaluation scene has one object)
    for sc, r in zip(scenes, results):
        by_category.setdefault(sc.objects[0].category, []).append(r)
    summary["category_correct_by_category"] = {k: summarise(v)["category_correct"]
                                               for k, v in sorted(by_category.items())}
    if grid_out is not None:    # rows of the prompts rendered exactly, each above the model's samples for them
        cols = min(8, grid_count, len(images))
        n = min(grid_count, len(images)) // cols * cols
        rows = [part[i:i + cols] for i in range(0, n, cols) for part in (gt, images)]
        save_png(grid(np.concatenate(rows) / 255.0, cols=cols), grid_out)
    return {"summary": summary, "prompts": texts[:grid_count],
            "settings": dict(prompts=prompts, steps=steps, guidance=guidance, seed=seed, sampler=sampler)}


def headline(summary: dict) -> str:
    return ", ".join(f"{k} {summary[k]['mean']:.3f}" for k in HEADLINE if k in summary)

"""Batched dual-branch sampling of jobs (prompt, target words, reference tokens, seed).

:func:`sample_batches` groups the jobs by compiled shape, pads each group's last batch with its
last job, builds the inputs (token ids, target-word masks, seeded latents, constant initial masks),
shards them over the data mesh and runs :func:`~customjax.sampling.dual_branch.dual_branch_sample`.
Shared by the sample CLI (``customjax.sample``) and the ShapeWorld benchmark.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from customjax.parallel import shard_batch
from customjax.sampling.common import seed_latents
from customjax.sampling.dual_branch import dual_branch_sample
from customjax.tokenizer import tokenize, word_token_positions


def resize_reference(img: np.ndarray, size: int) -> np.ndarray:
    """A float [0, 1] image (H, W, 3) resized (bicubic) to (size, size, 3), for the image encoder."""
    return np.asarray(Image.fromarray((img * 255).astype(np.uint8)).resize((size, size), Image.BICUBIC),
                      np.float32) / 255.0


@dataclasses.dataclass(frozen=True, eq=False)
class Job:
    """One image to sample: ``words`` are the target words in ``prompt`` (J of them), ``tokens`` the
    reference tokens (R, N, D); ``case``: the caller's own record, handed back with the results."""

    prompt: str
    words: Sequence[str]
    tokens: np.ndarray
    seed: int
    case: Any = None


def sample_batches(pipe, unet, sampler, gcfg, visual, params, jobs: Sequence[Job], batch_size: int, mesh,
                   image_hw: tuple[int, int], *, init_mask: float = 0.0
                   ) -> Iterator[tuple[list[Job], dict[str, np.ndarray]]]:
    """Samples ``jobs`` in batches of ``batch_size`` (a multiple of the mesh's batch divisor), one
    compiled shape per (J, tokens shape) group, groups in order of first appearance.

    ``unet``, ``sampler``, ``gcfg``, ``visual``, ``params``: as for ``dual_branch_sample`` (params
    replicated over ``mesh``); ``image_hw``: the image size (H, W); ``init_mask``: the value of the
    constant initial masks. Yields per batch (its jobs, without the padding; the sampler's outputs
    as numpy arrays for those jobs: ``images`` (n, H, W, 3) in [0, 1], ``masks`` (n, J, h, w) and,
    when ``gcfg.record_masks``, ``mask_steps`` (steps, n, J, h, w)).
    """
    H, W = image_hw
    f = pipe.vae_scale
    hw_mask = (H // f // gcfg.mask.mask_factor, W // f // gcfg.mask.mask_factor)
    groups: dict = {}
    for j in jobs:
        groups.setdefault((len(j.words), np.shape(j.tokens)), []).append(j)
    for (J, _), group in groups.items():
        for b in range(0, len(group), batch_size):
            real = group[b:b + batch_size]
            chunk = real + [real[-1]] * (batch_size - len(real))      # pad to one compiled shape
            ids = tuple(jnp.asarray(tokenize(t, [j.prompt for j in chunk])) for t in pipe.tokenizers)
            neg = tuple(jnp.asarray(tokenize(t, [""] * batch_size)) for t in pipe.tokenizers)
            wm = np.zeros((batch_size, J, ids[0].shape[1]), bool)
            for i, j in enumerate(chunk):
                for k, w in enumerate(j.words):
                    wm[i, k, word_token_positions(pipe.tokenizers[0], j.prompt, w)] = True
            feats = np.stack([j.tokens for j in chunk])
            lat = seed_latents([j.seed for j in chunk], (H // f, W // f, pipe.unet.config.in_channels))
            m0 = np.full((batch_size, J, *hw_mask), init_mask, np.float32)
            data = shard_batch(dict(ids=ids, neg=neg, wm=jnp.asarray(wm), feats=jnp.asarray(feats),
                                    lat=jnp.asarray(lat), m0=jnp.asarray(m0)), mesh)
            res = dual_branch_sample(pipe, unet, sampler, gcfg, visual, params, data["ids"], data["neg"],
                                     data["wm"], data["feats"], data["lat"], data["m0"], zero_uncond=pipe.is_sdxl)
            res = jax.tree_util.tree_map(np.asarray, res)
            n = len(real)
            out = {k: v[:, :n] if k == "mask_steps" else v[:n] for k, v in res.items()}
            yield real, out

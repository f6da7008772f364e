"""Batched dual-branch sampling of jobs (prompt, target words, reference tokens, seed).

:func:`sample_batches` groups the jobs by compiled shape, pads each group's last batch with its
last job, builds the inputs (token ids, target-word masks, seeded latents, constant initial masks),
shards them over the data mesh and runs :func:`~customjax.sampling.dual_branch.dual_branch_sample`.
Shared by the sample CLI (``customjax.sample``) and the ShapeWorld benchmark; the training
previews (``customjax.preview``) build their inputs with :func:`batch_inputs` too.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator, Sequence

import jax
import numpy as np

from customjax.parallel import shard_batch
from customjax.sampling.common import seed_latents
from customjax.sampling.dual_branch import dual_branch_sample
from customjax.tokenizer import tokenize, word_masks


@dataclasses.dataclass(frozen=True, eq=False)
class Job:
    """One image to sample: ``words`` are the target words in ``prompt`` (J of them), ``tokens`` the
    reference tokens (R, N, D); ``mask``: this image's initial masks (J, h, w) at the mask resolution in
    place of the constant ``init_mask`` (with ``t_stop == 0``, the masks throughout: a given layout);
    ``case``: the caller's own record, handed back with the results; ``null_tokens`` (R, N, D): the
    unconditional branch's tokens when the sampler's ``uncond_image`` is ``"zero"``."""

    prompt: str
    words: Sequence[str]
    tokens: np.ndarray
    seed: int
    case: Any = None
    mask: np.ndarray | None = None
    null_tokens: np.ndarray | None = None   # the unconditional branch's (guidance.uncond_image "zero")


def pad_to(items: Sequence, size: int) -> list:
    """``items`` padded to ``size`` with its last item (one compiled shape for a short batch)."""
    if not 0 < len(items) <= size:
        raise ValueError(f"cannot pad {len(items)} items to {size}")
    return list(items) + [items[-1]] * (size - len(items))


def negative_ids(pipe, batch: int, negative_prompt: str = "") -> tuple[np.ndarray, ...]:
    """Token ids of the negative prompt (default empty), (batch, 77) per tokenizer."""
    return tuple(np.repeat(tokenize(t, [negative_prompt]), batch, axis=0) for t in pipe.tokenizers)


def mask_hw(pipe, gcfg, image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (h, w) of the sampler's masks for images of ``image_hw``: the latent grid / ``mask_factor``."""
    f = pipe.vae_scale * gcfg.mask.mask_factor
    return image_hw[0] // f, image_hw[1] // f


def batch_inputs(pipe, gcfg, prompts: Sequence[str], words: Sequence[Sequence[str]], seeds: Sequence[int],
                 image_hw: tuple[int, int], *, init_mask: float = 0.0, neg: tuple | None = None
                 ) -> dict[str, Any]:
    """The sampler's text, noise and mask inputs of one batch, as numpy arrays: ``ids`` / ``neg``
    (token ids of the prompts / of the empty negative prompt, one (B, 77) array per tokenizer; ``neg``
    given: reused), ``wm`` (B, J, 77) target-word token masks (first tokenizer), ``lat`` seeded
    initial latents, ``m0`` (B, J, h, w) constant initial masks of value ``init_mask``."""
    H, W = image_hw
    f, B = pipe.vae_scale, len(prompts)
    wm = word_masks(pipe.tokenizers[0], prompts, words)
    hw_mask = mask_hw(pipe, gcfg, image_hw)
    return dict(ids=tuple(tokenize(t, list(prompts)) for t in pipe.tokenizers),
                neg=negative_ids(pipe, B) if neg is None else neg, wm=wm,
                lat=seed_latents(list(seeds), (H // f, W // f, pipe.unet.config.in_channels)),
                m0=np.full((B, wm.shape[1], *hw_mask), init_mask, np.float32))


def job_masks(jobs: Sequence[Job], m0: np.ndarray) -> np.ndarray:
    """``m0`` (B, J, h, w) with each job's own ``mask`` in place of its constant one."""
    out = m0.copy()
    for i, j in enumerate(jobs):
        if j.mask is not None:
            if np.shape(j.mask) != m0.shape[1:]:
                raise ValueError(f"job {j.prompt!r} (seed {j.seed}): mask of shape {np.shape(j.mask)}, the sampler "
                                 f"needs {m0.shape[1:]} (one map per target word at the mask resolution)")
            out[i] = j.mask
    return out


def sample_batches(pipe, unet, sampler, gcfg, visual, params, jobs: Sequence[Job], batch_size: int, mesh,
                   image_hw: tuple[int, int], *, init_mask: float = 0.0, negative_prompt: str = "",
                   text_tokens=None) -> Iterator[tuple[list[Job], dict[str, np.ndarray]]]:
    """Samples ``jobs`` in batches of ``batch_size`` (a multiple of the mesh's batch divisor), one
    compiled shape per (J, tokens shape) group, groups in order of first appearance.

    ``unet``, ``sampler``, ``gcfg``, ``visual``, ``params``: as for ``dual_branch_sample`` (params
    replicated over ``mesh``), ``text_tokens``; ``image_hw``: the image size (H, W); ``init_mask``: the value of the
    constant initial masks; ``negative_prompt``: the unconditional branch's text (empty: for SDXL
    zero embeddings, as diffusers). Yields per batch (its jobs, without the padding; the sampler's outputs
    as numpy arrays for those jobs: ``images`` (n, H, W, 3) in [0, 1], ``masks`` (n, J, h, w) and,
    when ``gcfg.record_masks``, ``mask_steps`` (steps, n, J, h, w)).
    """
    groups: dict = {}
    for j in jobs:
        groups.setdefault((len(j.words), np.shape(j.tokens)), []).append(j)
    neg = negative_ids(pipe, batch_size, negative_prompt)
    zero = gcfg.uncond_image == "zero"
    for group in groups.values():
        for b in range(0, len(group), batch_size):
            real = group[b:b + batch_size]
            chunk = pad_to(real, batch_size)
            x = batch_inputs(pipe, gcfg, [j.prompt for j in chunk], [j.words for j in chunk],
                             [j.seed for j in chunk], image_hw, init_mask=init_mask, neg=neg)
            x["m0"] = job_masks(chunk, x["m0"])
            x["feats"] = np.stack([j.tokens for j in chunk])
            if zero:
                x["null"] = np.stack([j.null_tokens for j in chunk])
            data = shard_batch(x, mesh)
            res = dual_branch_sample(pipe, unet, sampler, gcfg, visual, params, data["ids"], data["neg"],
                                     data["wm"], data["feats"], data["lat"], data["m0"],
                                     zero_uncond=pipe.is_sdxl and not negative_prompt, null_feats=data.get("null"),
                                     text_tokens=text_tokens)
            res = jax.tree_util.tree_map(np.asarray, res)
            n = len(real)
            out = {k: v[:, :n] if k == "mask_steps" else v[:n] for k, v in res.items()}
            yield real, out

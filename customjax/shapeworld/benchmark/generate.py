"""Sampling the benchmark's cases: a built method with its reference side (:class:`Model`), the
cases' reference tokens, and :func:`generate` (batched through ``customjax.sampling.batch``).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import numpy as np

from customjax.shapeworld.benchmark.cases import Case, place_masks


@dataclasses.dataclass
class Model:
    """One built method with its reference side and replicated sampler parameters."""

    cfg: Any
    built: Any
    params: Any
    side: Any                    # the method's SamplingSide (tokens, null_tokens, visual, ref_size)
    tokens: dict = dataclasses.field(default_factory=dict)   # (case name, null) -> (R, N, D)


def load_model(cfg, checkpoint: str | None, mesh) -> Model:
    """Builds ``cfg``'s method, loads the adapter ``checkpoint`` (none: random) and replicates the
    sampler parameters over ``mesh``."""
    import logging

    from customjax.methods.build import build, load_adapter, sampler_params, sampling_side
    from customjax.parallel import replicate

    built = build(cfg)
    if checkpoint:
        built = load_adapter(built, checkpoint)
    else:
        logging.warning("%s: no checkpoint, the adapter is randomly initialised (plumbing only)", cfg.method)
    return Model(cfg, built, replicate(sampler_params(built), mesh), sampling_side(built, cfg))


def reference_tokens(model: Model, case: Case, size: int, null: bool = False) -> np.ndarray:
    """The case's reference tokens (R, N, D) (``null``: the unconditional branch's), computed once
    per case and model."""
    import jax.numpy as jnp

    from customjax.images import resize_reference

    if (case.name, null) not in model.tokens:
        imgs = jnp.asarray(np.stack([resize_reference(r, model.side.ref_size) for r in case.reference_images(size)]))
        model.tokens[case.name, null] = np.asarray((model.side.null_tokens if null else model.side.tokens)(imgs))
    return model.tokens[case.name, null]


def generate(model: Model, gcfg, jobs: list[tuple[Case, int]], init_mask: float, batch: int, mesh, size: int,
             on_batch: Callable[[int], None] = lambda n: None, described: bool = False,
             layout: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (n, H, W, 3) and final masks (n, J, h, w) of ``jobs`` (case, seed), all with
    ``len(case.words) == J``, in batches of ``batch`` (the last padded: one compiled shape); prompts are
    the cases' own, or their :attr:`~customjax.shapeworld.benchmark.cases.Case.described_prompt` with ``described``;
    the initial masks are ``init_mask`` everywhere, or with ``layout`` each subject's named place
    (:func:`~customjax.shapeworld.benchmark.cases.place_masks`)."""
    from customjax.images import to_uint8
    from customjax.sampling.batch import Job, mask_hw, sample_batches
    from customjax.sampling.common import cached_sampler

    cfg, pipe = model.cfg, model.built.pipe
    smp = cached_sampler(pipe.schedule, cfg.sample.sampler, cfg.sample.steps)
    hw = mask_hw(pipe, gcfg, (size, size))
    zero = gcfg.uncond_image == "zero"
    work = [Job(c.described_prompt if described else c.prompt, c.words, reference_tokens(model, c, size), seed,
                mask=place_masks(c, *hw) if layout else None,
                null_tokens=reference_tokens(model, c, size, null=True) if zero else None) for c, seed in jobs]
    if len({(len(j.words), j.tokens.shape) for j in work}) > 1:
        raise ValueError("generate: every job needs the same number of subjects and reference tokens")
    images, masks = [], []
    for done, res in sample_batches(pipe, model.built.unet, smp, gcfg, model.side.visual, model.params, work, batch,
                                    mesh, (size, size), init_mask=init_mask,
                                    negative_prompt=cfg.sample.get("negative_prompt", ""),
                                    text_tokens=model.side.text_tokens):
        images.append(to_uint8(res["images"]))
        masks.append(res["masks"])
        on_batch(len(done))
    return np.concatenate(images), np.concatenate(masks)

"""The Python API; the command-line tools are thin wrappers over it.

    from customjax import api
    pipe = api.Customizer.from_config("configs/realcustompp.py:shapeworld", checkpoint="runs/sw/export")
    out = pipe("a star on the left", references="examples/shapeworld/s000_ref0.png", words="star", seeds=[0, 1])
    out.images, out.masks, out.record; out.save("out/sample")      # PNGs, overlays, grid.png, record.json

    api.train(api.load_config("configs/realcustompp.py:tiny", train={"steps": 20}), "runs/tiny")
    api.export("runs/tiny", "adapter.safetensors")

:class:`Customizer` follows diffusers' pipelines (build once from folders, then call with prompts);
:func:`train` the flax examples' ``train_and_evaluate(config, workdir)``.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from customjax.sampling.cases import CaseError, as_list, check_cases

__all__ = ["Customizer", "Samples", "load_config", "train", "export", "CaseError"]


def load_config(spec: str | os.PathLike, **overrides: Any):
    """The ConfigDict of a config file, as ``--config`` names it: ``"configs/realcustompp.py:sd15,public"``
    (file, then ``:`` and the argument of its ``get_config``; none: the file's default). ``overrides``:
    sections or keys to set, as ``--config.X.Y=v`` does: ``train={"steps": 20}``, ``seed=1``; an unknown
    key is an error naming it."""
    spec = os.fspath(spec)
    path, sep, arg = spec.rpartition(":") if ":" in spec and not spec.endswith(".py") else (spec, "", "")
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"config file {file} does not exist")
    module_spec = importlib.util.spec_from_file_location(f"_customjax_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    config = module.get_config(arg) if sep else module.get_config()
    for key, value in overrides.items():
        if key not in config:
            raise KeyError(f"{file}: unknown config key {key!r} (known: {sorted(config.keys())})")
        if isinstance(value, dict):
            for sub, v in value.items():
                if sub not in config[key]:
                    raise KeyError(f"{file}: unknown config key {key}.{sub}")
                config[key][sub] = v
        else:
            config[key] = value
    return config


@dataclasses.dataclass
class Samples:
    """What a :class:`Customizer` call returns, one entry per sampled image (prompt x seed):
    ``images`` (N, H, W, 3) float in [0, 1]; ``masks``: per image (J, h, w) subject masks (None for a
    method without masks); ``mask_steps``: per image (steps, J, h, w) or None; ``cases``: per image its
    prompt, words, seed, references (paths or ``<array HxW>``) and reference images; ``record``: the
    settings and seconds (what ``record.json`` holds)."""

    images: np.ndarray
    masks: list | None
    mask_steps: list | None
    cases: list[dict]
    record: dict

    def overlays(self) -> list | None:
        from customjax.images import overlay

        if self.masks is None:
            return None
        return [overlay(i, m) for i, m in zip(self.images, self.masks)]

    def sheet(self, min_size: int = 256, overlays: list | None = None) -> np.ndarray:
        """One row per prompt: the prompt as text, the reference(s), each sample and its mask overlay,
        upscaled (nearest) to at least ``min_size`` px (:func:`customjax.images.sheet`)."""
        from customjax.images import case_rows, sheet

        overlays = self.overlays() if overlays is None else overlays
        return sheet(case_rows(self.cases, list(self.images), overlays), min_size=min_size)

    def save(self, out: str | os.PathLike) -> Path:
        """Writes per image ``NNNN_seedS.png``, its masks over it (``*_mask.png``) and the per-step mask
        strip (``*_steps.png``), the contact sheet ``grid.png`` and ``record.json``; returns ``out``."""
        from customjax.images import mask_strip, save_png

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        overlays = self.overlays()
        for i, image in enumerate(self.images):
            name = Path(self.record["images"][i]["file"]).stem
            save_png(image, out / f"{name}.png")
            if overlays is not None:
                save_png(overlays[i], out / f"{name}_mask.png")
            if self.mask_steps is not None:
                save_png(mask_strip(self.mask_steps[i]), out / f"{name}_steps.png")
        save_png(self.sheet(overlays=overlays), out / "grid.png")
        (out / "record.json").write_text(json.dumps(self.record, indent=2))
        return out


class Customizer:
    """A base model with a method's adapter, ready to sample (one jitted dual-branch sampler).
    Build with :meth:`from_config`; call with prompts, references and target words."""

    def __init__(self, config, built, checkpoint: str | None = None):
        from customjax.methods.build import guidance_config, sampler_params, sampling_side
        from customjax.parallel import data_mesh, replicate
        from customjax.sampling.common import cached_sampler

        self.config, self.built, self.checkpoint = config, built, checkpoint
        self.guidance = guidance_config(config)
        self.side = sampling_side(built, config)
        self.mesh = data_mesh()
        self.params = replicate(sampler_params(built), self.mesh)
        self.sampler = cached_sampler(built.pipe.schedule, config.sample.sampler, config.sample.steps)

    @classmethod
    def from_config(cls, config, checkpoint: str | os.PathLike | None = None, concepts: Sequence = (),
                    **overrides: Any) -> "Customizer":
        """``config``: a ConfigDict or a config spec (:func:`load_config`, with ``overrides``);
        ``checkpoint``: a trained adapter (a folder holding ``adapter.safetensors``, or a file the method
        reads, e.g. the released RealCustom++ checkpoint); None: a random adapter (plumbing only);
        ``concepts``: fine-tuned concept exports (``customjax.finetune``) loaded into the base (their words,
        text encoder, LoRA / K, V). Paths and the checkpoint's method are checked before the model is built."""
        import logging

        from customjax.base_model import check_config_paths
        from customjax.methods.build import build, check_checkpoint, load_adapter

        if isinstance(config, (str, os.PathLike)):
            config = load_config(config, **overrides)
        elif overrides:
            raise TypeError(f"overrides {sorted(overrides)} apply to a config spec; set them on the ConfigDict instead")
        check_config_paths(config)
        if checkpoint is not None:
            check_checkpoint(checkpoint, config.method)
        built = build(config)
        if checkpoint is not None:
            built = load_adapter(built, checkpoint)
        else:
            logging.getLogger(__name__).warning("no checkpoint: the adapter is randomly initialised (plumbing only)")
        for folder in concepts:
            from customjax.concepts.export import load_concept
            pipe, p, _ = load_concept(built.pipe, built.params, folder)
            built = dataclasses.replace(built, pipe=pipe, params=dict(built.params, unet=p["unet"],
                                                                      text_encoders=p["text_encoders"]))
        return cls(config, built, None if checkpoint is None else str(checkpoint))

    def check(self, prompts: str | Sequence[str], references, words=None, masks=None,
              seeds: Sequence[int] | None = None) -> list[dict]:
        """The checked cases of a call (see :meth:`__call__`); a :class:`CaseError` names the prompt at fault."""
        single = isinstance(prompts, str)
        prompts = [prompts] if single else list(prompts)
        per = lambda v: [v] * len(prompts) if v is None else ([v] if single else list(v))   # noqa: E731
        references, words, masks = per(references), per(words), per(masks)
        for name, v in (("references", references), ("words", words), ("masks", masks)):
            if len(v) != len(prompts):
                raise CaseError(f"{len(prompts)} prompt(s) but {len(v)} {name}: give one entry per prompt")
        cases = [dict(prompt=p, references=as_list(r), _where=f"prompt {i} ({p!r})",
                      **({} if w is None else {"words": [w] if isinstance(w, str) else list(w)}),
                      **({} if m is None else {"masks": as_list(m, ndim=2)}))
                 for i, (p, r, w, m) in enumerate(zip(prompts, references, words, masks))]
        return check_cases(cases, self.built.pipe.tokenizers[0], self.guidance.references,
                           list(self.config.sample.seeds), seeds_override=seeds,
                           words_required=self.guidance.masked)

    def __call__(self, prompts: str | Sequence[str], references, words=None, masks=None,
                 seeds: Sequence[int] | None = None, progress: bool = False) -> Samples:
        """Samples every prompt with every seed. Per prompt (one value, or a list with one entry per
        prompt): ``references``, the reference image(s) (paths, PIL images or (H, W, 3) arrays; one per
        target word, or one for all with ``guidance.references="one2many"``); ``words``, the target
        word(s) in the prompt whose attention marks the subject (RealCustom's real words); ``masks``,
        optional layout masks (one (H, W) image per word, fixed for the whole sampling). ``seeds``: for
        every prompt (default: ``config.sample.seeds``)."""
        return self.sample_cases(self.check(prompts, references, words, masks, seeds), progress=progress)

    def sample_cases(self, cases: list[dict], progress: bool = False) -> Samples:
        """Samples checked cases (:func:`customjax.sampling.cases.check_cases`, as the sample CLI reads
        them from JSONL): attention-mask cases with the config's guidance, layout cases with their masks
        fixed (``t_stop = 0``)."""
        import jax
        import jax.numpy as jnp
        from tqdm import tqdm

        from customjax.images import resize_reference
        from customjax.sampling.batch import Job, mask_hw, sample_batches
        from customjax.sampling.cases import resize_masks
        from customjax.sampling.dual_branch import unet_evaluations

        t0 = time.time()
        cfg, g, ss, pipe = self.config, self.guidance, self.side, self.built.pipe
        zero = g.uncond_image == "zero"
        for c in cases:                       # reference tokens, once per case
            imgs = jnp.asarray(np.stack([resize_reference(i, ss.ref_size) for i in c["images"]]))
            c["tokens"] = np.asarray(ss.tokens(imgs))
            c["null_tokens"] = np.asarray(ss.null_tokens(imgs)) if zero else None
        hw = mask_hw(pipe, g, (cfg.sample.height, cfg.sample.width))
        jobs = [Job(c["prompt"], c["words"], c["tokens"], s, case=c, null_tokens=c["null_tokens"],
                    mask=None if c["masks"] is None else resize_masks(c["masks"], hw))
                for c in cases for s in c["seeds"]]
        runs = [(gc, [j for j in jobs if (j.mask is not None) == layout])
                for gc, layout in ((g, False), (dataclasses.replace(g, t_stop=0), True))]
        divisor = self.mesh.shape["data"]
        bsz = max(int(cfg.sample.batch), divisor)
        bsz += -bsz % divisor
        images, masks, steps, per_image, records = [], [], [], [], []
        with tqdm(total=len(jobs), desc="sampling", unit="img", disable=not progress) as bar:
            for gc, part in runs:
                if not part:
                    continue
                for done, res in sample_batches(pipe, self.built.unet, self.sampler, gc, ss.visual, self.params,
                                                part, bsz, self.mesh, (cfg.sample.height, cfg.sample.width),
                                                init_mask=float(cfg.guidance.get("init_mask", 0.0)),
                                                negative_prompt=cfg.sample.get("negative_prompt", ""),
                                                text_tokens=ss.text_tokens):
                    for i, job in enumerate(done):
                        c = job.case
                        images.append(res["images"][i])
                        masks.append(res["masks"][i])
                        steps.append(res["mask_steps"][:, i] if "mask_steps" in res else None)
                        per_image.append(dict(prompt=c["prompt"], words=c["words"], seed=job.seed,
                                              references=c["references"], reference_images=c["images"],
                                              layout=job.mask is not None))
                        records.append(dict(file=f"{len(records):04d}_seed{job.seed}.png", prompt=c["prompt"],
                                            words=c["words"], references=c["references"], seed=job.seed,
                                            case=c["where"], layout=job.mask is not None,
                                            unet_evaluations=unet_evaluations(gc, cfg.sample.steps)))
                    bar.update(len(done))
        masked = g.masked
        record = dict(config=json.loads(cfg.to_json_best_effort()), checkpoint=self.checkpoint,
                      device=str(jax.devices()[0]), devices=len(jax.devices()), batch=bsz,
                      unet_evaluations_per_image=unet_evaluations(g, cfg.sample.steps),  # attention-mask cases
                      seconds=round(time.time() - t0, 2), images=records)
        return Samples(np.stack(images) if images else np.zeros((0, cfg.sample.height, cfg.sample.width, 3)),
                       masks if masked else None,
                       steps if masked and all(s is not None for s in steps) else None, per_image, record)


def train(config, workdir: str | os.PathLike, **kwargs: Any) -> dict:
    """Trains (or resumes) the adapter of ``config`` (a ConfigDict or a spec for :func:`load_config`) in
    ``workdir`` and exports it to ``workdir/export``; returns the last metrics with ``step`` and
    ``status``. ``kwargs``: ``stop_after``, ``allow_changes`` (:func:`customjax.train.train`)."""
    from customjax.train import train as _train

    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    return _train(config, os.fspath(workdir), **kwargs)


def export(workdir: str | os.PathLike, out: str | os.PathLike, **kwargs: Any) -> Path:
    """The trainable weights of a run's checkpoint as one safetensors file (:func:`customjax.export.export`:
    ``step``, ``ema``, ``public``)."""
    from customjax.export import export as _export

    return _export(os.fspath(workdir), os.fspath(out), **kwargs)


def finetune(config, concepts, workdir: str | os.PathLike, **kwargs: Any) -> dict:
    """Fine-tunes the concept folders ``concepts`` (paths) together with a per-concept method
    (``config``: a ConfigDict or a spec, e.g. ``"configs/textual_inversion.py:sd15"``) in ``workdir`` and
    exports each to ``workdir/export/<concept>`` (:func:`customjax.finetune.finetune`; ``stop_after``)."""
    from pathlib import Path as _Path

    from customjax.finetune import finetune as _finetune

    if isinstance(config, (str, os.PathLike)):
        config = load_config(config)
    return _finetune(config, [_Path(c) for c in concepts], os.fspath(workdir), **kwargs)


def text_to_image(model: str | os.PathLike, prompts: list[str], concepts=(), seeds=(0,), **kwargs: Any):
    """Images (N, H, W, 3) in [0, 1] of ``prompts`` x ``seeds`` from the diffusers folder ``model`` with the
    fine-tuned ``concepts`` (export folders) loaded (:func:`customjax.sampling.t2i.txt2img` settings:
    ``steps``, ``guidance``, ``sampler``, ``height``, ``width``)."""
    import numpy as np

    from customjax.concepts.export import load_concept
    from customjax.pipeline import load_stable_diffusion
    from customjax.sampling.common import seed_latents
    from customjax.sampling.t2i import txt2img

    pipe, params = load_stable_diffusion(model)
    for folder in concepts:
        pipe, params, _ = load_concept(pipe, params, folder)
    f = pipe.vae_scale
    h = kwargs.pop("height", None) or pipe.unet.config.sample_size * f
    w = kwargs.pop("width", None) or pipe.unet.config.sample_size * f
    jobs = [(p, s) for p in prompts for s in seeds]
    lat = seed_latents([s for _, s in jobs], (h // f, w // f, pipe.unet.config.in_channels))
    return np.asarray(txt2img(pipe, params, [p for p, _ in jobs], None, height=h, width=w, latents=lat, **kwargs))


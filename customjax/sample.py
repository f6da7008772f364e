"""Batch sampling with any registered method (one jitted dual-branch sampler).

    python -m customjax.sample --config configs/realcustompp.py:sdxl --checkpoint CKPT \
        --prompts cases.jsonl --config.model.path /path/to/sdxl --config.encoders.siglip ... 

``--prompts`` is a JSONL file, one case a line::

    {"prompt": "a toy on the beach", "words": ["toy"], "references": ["toy.png"], "seeds": [0, 1]}

(or ``--prompt`` / ``--word`` / ``--reference`` flags for one case); ``"masks": ["left.png", ...]``, one
per word, fixes the subjects' masks to a drawn layout (sampled with ``t_stop = 0``: no attention masks).
Every case is checked before anything compiles: the target words must be in the prompt, the
references and masks must be readable images. Writes per image a PNG, the final masks over it
(``*_mask.png``), the per-step mask strip (``*_steps.png``), a grid, and ``record.json`` with every
setting and seed.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from tqdm import tqdm

from customjax.images import grid, mask_strip, overlay, resize_reference, save_png
from customjax.base_model import check_config_paths, first_tokenizer
from customjax.cli import fail, parse_flags
from customjax.methods.build import (build, check_checkpoint, guidance_config, load_adapter, sampler_params,
                                     sampling_side)
from customjax.parallel import data_mesh, replicate
from customjax.sampling.batch import Job, mask_hw, sample_batches
from customjax.sampling.cases import CaseError, check_cases, read_cases, resize_masks
from customjax.sampling.common import cached_sampler
from customjax.sampling.dual_branch import unet_evaluations

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined on use, so that importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "method config file[:variant[,ablation...]]", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "adapter checkpoint (folder with adapter.safetensors, or the public "
                        "RealCustom++ file); without it the adapter is randomly initialised")
    flags.DEFINE_string("prompts", None, "JSONL file of cases (prompt, words, references, seeds)")
    flags.DEFINE_string("prompt", None, "one prompt (with --word and --reference)")
    flags.DEFINE_multi_string("word", [], "target real word(s) of --prompt")
    flags.DEFINE_multi_string("reference", [], "reference image(s) of --prompt")
    flags.DEFINE_multi_string("mask", [], "layout mask image(s) of --prompt, one per --word (optional)")
    flags.DEFINE_list("seeds", None, "seeds for every case (default: the case's own, else config.sample.seeds)")
    flags.DEFINE_string("out", None, "output folder (default: config.sample.out)")


def flag_cases() -> list[dict]:
    """The cases the flags name: ``--prompts`` (a JSONL file) or ``--prompt`` / ``--word`` / ``--reference``."""
    if FLAGS.prompts:
        return read_cases(FLAGS.prompts)
    if FLAGS.prompt:
        return [{"prompt": FLAGS.prompt, "words": FLAGS.word, "references": FLAGS.reference,
                 "masks": FLAGS.mask or None, "_where": "flags"}]
    raise CaseError("give --prompts FILE.jsonl, or --prompt with --word and --reference")


def main(argv) -> None:
    del argv
    cfg = FLAGS.config
    if cfg is None:
        raise app.UsageError("--config is required, e.g. --config configs/realcustompp.py:tiny")
    t0 = time.time()
    try:
        check_config_paths(cfg)
    except FileNotFoundError as e:
        fail("customjax.sample", str(e))
    gcfg = guidance_config(cfg)
    cases = check_cases(flag_cases(), first_tokenizer(cfg), gcfg.references, list(cfg.sample.seeds),
                        seeds_override=FLAGS.seeds, words_required=gcfg.masked)
    if FLAGS.checkpoint:          # before the models are built (minutes for SDXL)
        try:
            check_checkpoint(FLAGS.checkpoint, cfg.method)
        except (FileNotFoundError, ValueError) as e:
            fail("customjax.sample", str(e))
    built = build(cfg)
    pipe = built.pipe
    if FLAGS.checkpoint:
        built = load_adapter(built, FLAGS.checkpoint)
    else:
        logging.warning("no --checkpoint: the adapter is randomly initialised (shapes and plumbing only)")
    out = Path(FLAGS.out or cfg.sample.out)
    out.mkdir(parents=True, exist_ok=True)

    # reference tokens, once per reference image
    ss = sampling_side(built, cfg)
    zero = gcfg.uncond_image == "zero"
    for c in cases:
        imgs = jnp.asarray(np.stack([resize_reference(i, ss.ref_size) for i in c["images"]]))
        c["tokens"] = np.asarray(ss.tokens(imgs))
        c["null_tokens"] = np.asarray(ss.null_tokens(imgs)) if zero else None

    hw = mask_hw(pipe, gcfg, (cfg.sample.height, cfg.sample.width))
    jobs = [Job(c["prompt"], c["words"], c["tokens"], s, case=c, null_tokens=c["null_tokens"],
                mask=None if c["masks"] is None else resize_masks(c["masks"], hw))
            for c in cases for s in c["seeds"]]
    # attention-mask cases with the config's guidance; layout cases with their masks fixed (no guidance branch)
    runs = [(g, [j for j in jobs if (j.mask is not None) == layout])
            for g, layout in ((gcfg, False), (dataclasses.replace(gcfg, t_stop=0), True))]
    init_mask = float(cfg.guidance.get("init_mask", 0.0))
    mesh = data_mesh()
    bsz = max(cfg.sample.batch, mesh.shape["data"])
    bsz += -bsz % mesh.shape["data"]
    params = replicate(sampler_params(built), mesh)
    smp = cached_sampler(pipe.schedule, cfg.sample.sampler, cfg.sample.steps)
    records, images = [], []
    with tqdm(total=len(jobs), desc="sampling", unit="img") as bar:
        for g, part in runs:
            if not part:
                continue
            for done, res in sample_batches(pipe, built.unet, smp, g, ss.visual, params, part, bsz, mesh,
                                            (cfg.sample.height, cfg.sample.width), init_mask=init_mask,
                                            negative_prompt=cfg.sample.get("negative_prompt", "")):
                for i, job in enumerate(done):
                    c, s = job.case, job.seed
                    name = f"{len(records):04d}_seed{s}"
                    save_png(res["images"][i], out / f"{name}.png")
                    if gcfg.masked:
                        save_png(overlay(res["images"][i], res["masks"][i]), out / f"{name}_mask.png")
                    if "mask_steps" in res and gcfg.masked:
                        save_png(mask_strip(res["mask_steps"][:, i]), out / f"{name}_steps.png")
                    records.append(dict(file=f"{name}.png", prompt=c["prompt"], words=c["words"],
                                        references=c["references"], seed=s, case=c["where"],
                                        layout=job.mask is not None,
                                        unet_evaluations=unet_evaluations(g, cfg.sample.steps)))
                    images.append(res["images"][i])
                bar.update(len(done))
    save_png(grid(np.stack(images)), out / "grid.png")
    record = dict(config=json.loads(cfg.to_json_best_effort()), checkpoint=FLAGS.checkpoint,
                  device=str(jax.devices()[0]), devices=len(jax.devices()), batch=bsz,
                  unet_evaluations_per_image=unet_evaluations(gcfg, cfg.sample.steps),   # attention-mask cases
                  seconds=round(time.time() - t0, 2), images=records)
    (out / "record.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {len(records)} images, masks and grid.png to {out}")


def run() -> None:
    define_flags()
    def _main(argv):
        try:
            main(argv)
        except CaseError as e:
            fail("customjax.sample", str(e))
    app.run(_main, flags_parser=parse_flags("customjax.sample"))


if __name__ == "__main__":
    run()

"""Text-to-image from a diffusers Stable Diffusion folder (SD-1.x, SD-2.x, SDXL), jitted.

    python -m customjax.txt2img --model /path/to/stable-diffusion-v1-5 \
        --prompt "a photo of a red toy" --seeds 0,1,2,3 --out out/

Writes one PNG per (prompt, seed), a grid, and record.json with every setting and seed.
``--concept DIR`` (repeatable): a concept exported by ``python -m customjax.finetune`` (its learnt word
and weights; each concept needs its own word); DreamBooth's export is a whole pipeline (``--model
DIR/model``).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from tqdm import tqdm

from customjax.cli import fail, parse_flags
from customjax.images import grid, save_png
from customjax.pipeline import load_stable_diffusion
from customjax.sampling.common import SAMPLERS, seed_latents
from customjax.sampling.t2i import txt2img

FLAGS = flags.FLAGS
PROG = "customjax.txt2img"


def define_flags() -> None:
    """The command's flags (defined on use, so that importing this module defines none)."""
    flags.DEFINE_string("model", None, "diffusers pipeline folder (model_index.json, unet/, vae/, ...)", required=True)
    flags.DEFINE_multi_string("prompt", [], "a prompt (repeatable)")
    flags.DEFINE_multi_string("concept", [], "a concept folder exported by customjax.finetune (repeatable)")
    flags.DEFINE_string("prompts_file", None, "text file, one prompt per line")
    flags.DEFINE_string("negative_prompt", "", "negative prompt")
    flags.DEFINE_list("seeds", ["0"], "seeds; every prompt is sampled with every seed")
    flags.DEFINE_integer("steps", 25, "denoising steps")
    flags.DEFINE_float("guidance", 7.5, "classifier-free guidance scale")
    flags.DEFINE_enum("sampler", "ddim", list(SAMPLERS), "sampler")
    flags.DEFINE_integer("height", None, "image height (default: the model's)")
    flags.DEFINE_integer("width", None, "image width (default: the model's)")
    flags.DEFINE_integer("batch", 4, "images per compiled call", lower_bound=1)
    flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "compute dtype (parameters stay float32)")
    flags.DEFINE_string("out", "out/txt2img", "output folder")
    flags.register_validator("seeds", _int_seeds, "--seeds must be comma-separated integers")


def _int_seeds(seeds: list[str]) -> bool:
    try:
        [int(s) for s in seeds]
    except ValueError:
        return False
    return True


def _prompts() -> list[str]:
    prompts = list(FLAGS.prompt)
    if FLAGS.prompts_file:
        if not Path(FLAGS.prompts_file).is_file():
            fail(PROG, f"--prompts_file {FLAGS.prompts_file}: no such file")
        prompts += [l.strip() for l in Path(FLAGS.prompts_file).read_text().splitlines() if l.strip()]
    if not prompts:
        fail(PROG, "give --prompt or --prompts_file (with at least one prompt)")
    return prompts


def main(argv) -> None:
    del argv
    prompts = _prompts()
    seeds = [int(s) for s in FLAGS.seeds]      # integers: the flag's validator
    pipe, params = load_stable_diffusion(FLAGS.model, dtype=jnp.dtype(FLAGS.dtype))
    for folder in FLAGS.concept:
        from customjax.concepts.export import load_concept
        try:
            pipe, params, _ = load_concept(pipe, params, folder)
        except (FileNotFoundError, ValueError) as e:
            fail(PROG, f"--concept {folder}: {e}")
    out = Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(p, s) for p in prompts for s in seeds]
    images, records, t0 = [], [], time.time()
    for b in tqdm(range(0, len(jobs), FLAGS.batch), desc="sampling", unit="batch"):
        chunk = jobs[b:b + FLAGS.batch]
        # one noise draw per seed, so an image does not depend on its batch neighbours
        size = pipe.unet.config.sample_size * pipe.vae_scale
        h, w, f = FLAGS.height or size, FLAGS.width or size, pipe.vae_scale
        lat = seed_latents([s for _, s in chunk], (h // f, w // f, pipe.unet.config.in_channels))
        pad = FLAGS.batch - len(chunk)  # keep one compiled shape
        lat = np.concatenate([lat, np.repeat(lat[-1:], pad, axis=0)]) if pad else lat
        imgs = txt2img(pipe, params, [p for p, _ in chunk] + [chunk[-1][0]] * pad, jax.random.key(0),
                       steps=FLAGS.steps, guidance=FLAGS.guidance, sampler=FLAGS.sampler, height=h, width=w,
                       negative_prompt=FLAGS.negative_prompt, latents=lat)[:len(chunk)]
        for (p, s), img in zip(chunk, imgs):
            name = f"{len(records):04d}_seed{s}.png"
            save_png(img, out / name)
            records.append({"file": name, "prompt": p, "seed": s})
            images.append(img)
    save_png(grid(np.stack(images), cols=len(seeds)), out / "grid.png")
    record = {"model": str(FLAGS.model), "concepts": list(FLAGS.concept), "steps": FLAGS.steps, "guidance": FLAGS.guidance,
              "sampler": FLAGS.sampler, "negative_prompt": FLAGS.negative_prompt, "dtype": FLAGS.dtype,
              "device": str(jax.devices()[0]), "seconds": round(time.time() - t0, 2), "images": records}
    (out / "record.json").write_text(json.dumps(record, indent=2))
    print(f"wrote {len(records)} images and grid.png to {out}")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags(PROG, ()))

"""Word binding of a ShapeWorld base (:mod:`customjax.metrics.binding`), teacher-forced: the
two-subject benchmark cases rendered exactly, their VAE latents noised at t, the UNet run on the case
prompt with every cross-attention layer captured; per layer and t, each subject's category word's
binding to its own object (0.5 = none), the words' attention mass and densities.

    python benchmarks/word_binding.py --model customjax/shapeworld/assets/shapeworld_base --pairs 30 \
        --out benchmarks/results/word_binding_shapeworld_cpu.json
"""

from __future__ import annotations

import json
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from customjax.shapeworld.benchmark.cases import make_cases
from customjax.provenance import git_state
from customjax.control.capture import collect
from customjax.control.spec import Capture, ControlConfig
from customjax.shapeworld import world as sw
from customjax.losses import coverage
from customjax.metrics.binding import word_binding
from customjax.pipeline import load_stable_diffusion
from customjax.shapeworld.pretrain.vae import encode
from customjax.schedulers import add_noise, noise_schedule
from customjax.tokenizer import tokenize, word_token_positions

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined on use: tests import this module beside other benchmarks)."""
    flags.DEFINE_string("model", "customjax/shapeworld/assets/shapeworld_base", "ShapeWorld base folder")
    flags.DEFINE_integer("pairs", 30, "two-subject benchmark cases (make_cases(2, 0, size, pairs=...))")
    flags.DEFINE_list("t", ["100", "300", "500", "700", "900"], "noise levels")
    flags.DEFINE_integer("draws", 2, "noise draws per case and t")
    flags.DEFINE_string("out", None, "results JSON", required=True)


def _mean_se(draws: list) -> dict:
    """Mean and standard error over cases (each case's value averaged over draws and subjects)."""
    per_case = np.stack(draws).reshape(len(draws), draws[0].shape[0], -1).mean((0, 2))
    return dict(mean=round(float(per_case.mean()), 3), se=round(float(per_case.std() / np.sqrt(len(per_case))), 3))


def measure(model: str, pairs: int, ts, draws: int) -> dict:
    pipe, params = load_stable_diffusion(model)
    size = pipe.unet.config.sample_size * pipe.vae_scale
    _, cases = make_cases(2, 0, size, pairs=pairs)
    tok = pipe.tokenizers[0]
    rendered = [sw.render(c.scene, size) for c in cases]
    images = np.stack([im for im, _ in rendered])
    masks = np.stack([m[:2] for _, m in rendered]).astype(np.float32)       # (B, 2, H, W): the two subjects
    ids = tokenize(tok, [c.prompt for c in cases])
    words = np.zeros((len(cases), 2, ids.shape[1]), bool)
    for i, c in enumerate(cases):
        for s, w in enumerate(c.words):
            words[i, s, word_token_positions(tok, c.prompt, w)] = True
    ctx = pipe.text_encoders[0].apply({"params": params["text_encoders"][0]}, ids).last_hidden_state
    mean = np.split(encode(pipe.vae, params["vae"], images), 2, axis=-1)[0]
    z0 = jnp.asarray(mean) * pipe.vae.config.scaling_factor
    sched = noise_schedule(pipe.schedule)
    unet = pipe.unet.clone(control=ControlConfig(capture=Capture(cross_probs=(1, 2, 4, 8))))

    @jax.jit
    def maps(unet_p, z, t, ctx):
        _, state = unet.apply({"params": unet_p}, z, t, ctx, mutable=["attention"])
        return [p for _, p in collect(state, "cross_probs")]

    pooled = {}     # each subject's object coverage on a layer's grid, by grid size

    def regions(h):
        if h not in pooled:
            pooled[h] = coverage(masks.reshape(-1, size, size), (h, h)).reshape(len(cases), 2, h, h)
        return pooled[h]

    out = {}
    for t in ts:
        acc: dict = {}
        for d in range(draws):
            noise = jax.random.normal(jax.random.key(1000 * d + t), z0.shape)
            tt = jnp.full((len(cases),), t)
            layers = jax.device_get(maps(params["unet"], add_noise(sched, z0, noise, tt), tt, ctx))
            for k, probs in enumerate(layers):
                h = int(round(probs.shape[1] ** 0.5))
                for name, v in word_binding(probs, words, regions(h)).items():
                    acc.setdefault(f"{k}:{h}x{h}", {}).setdefault(name, []).append(v)
        out[str(t)] = {layer: {name: _mean_se(v) for name, v in stats.items()} for layer, stats in acc.items()}
    return out


def main(argv) -> None:
    del argv
    t0 = time.time()
    res = measure(FLAGS.model, FLAGS.pairs, [int(t) for t in FLAGS.t], FLAGS.draws)
    record = dict(what=__doc__.split("\n\n")[0], model=FLAGS.model, pairs=FLAGS.pairs, draws=FLAGS.draws,
                  layers="index:grid in call order (down, mid, up)", device=str(jax.devices()[0].device_kind),
                  **git_state(), seconds=round(time.time() - t0, 1), by_t=res)
    with open(FLAGS.out, "w") as f:
        json.dump(record, f, indent=1)
    for t, layers in res.items():
        print(f"t={t}: " + ", ".join(f"{k} {v['binding']['mean']:.3f}" for k, v in layers.items()))


if __name__ == "__main__":
    define_flags()
    app.run(main)

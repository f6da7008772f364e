"""How much of the training loss can a reference's appearance remove? On ShapeWorld multiview objects
(target = frame 0, reference = frame 1), the objective's v-loss, with the same noise and timesteps, of:

  * ``dropped``: the caption without the subject's appearance, no reference (the frozen base);
  * ``text oracle``: the caption with the appearance named, no reference: the gain an ideal use of the
    appearance can reach through this base;
  * each adapter (and a random one) with the reference (whole frame and cut to the subject's mask).

Gain = dropped - loss (95% interval over objects x draws). ``--captions scene`` names the target frame's
background, positions and sizes in both captions (only the appearance differs); ``category`` uses the
multiview records' own caption ("a star") against the subject phrase ("a red striped star").

    python benchmarks/appearance_signal.py --config configs/realcustompp.py:shapeworld \
        --checkpoint runs/sw_pp/export --captions scene --objects 192 --out benchmarks/results/appearance_signal_cpu.json
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags
from PIL import Image

from customjax import trainer
from customjax.shapeworld.benchmark.loss_gain import DROPPED, WITH, jitted_objective, paired_gain
from customjax.provenance import git_state
from customjax.data import images
from customjax.shapeworld import world as sw
from customjax.methods.build import build, load_adapter, reference_size
from customjax.tokenizer import tokenize

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined on use: tests import this module beside other benchmarks)."""
    config_flags.DEFINE_config_file("config", None, "method config file[:variant] (a ShapeWorld base)", lock_config=False)
    flags.DEFINE_multi_string("checkpoint", [], "adapter folder (adapter.safetensors); may repeat")
    flags.DEFINE_enum("captions", "scene", ["scene", "category"], "what both captions name besides the appearance")
    flags.DEFINE_integer("objects", 192, "multiview objects (held apart from training: indices from 100000)")
    flags.DEFINE_integer("draws", 3, "noise / timestep draws per object")
    flags.DEFINE_string("out", None, "JSON results file")

BATCH = 8


def without_appearance(scene: sw.Scene) -> sw.Scene:
    return sw.Scene(scene.background, (dataclasses.replace(scene.objects[0], appearance=None),) + scene.objects[1:])


def reference(image: np.ndarray, mask: np.ndarray, cut: bool, side: int) -> np.ndarray:
    """The reference as the loader gives it at crop ratio 1: whole frame or subject cut-out, resized."""
    im, size = Image.fromarray(image), image.shape[:2]
    if cut:
        im, size = images.subject_cutout(im, Image.fromarray(mask.astype(np.uint8) * 255))
    box = images.reference_crop_box(size, side, 1.0, (0.5, 0.5))
    return np.asarray(images.crop_resize(im, size, box, (side, side)), np.float32) / 255.0


def batches(n: int, size: int, side: int, captions: str) -> list[dict]:
    out = []
    recs = [sw.multiview_record(0, 100_000 + i, frames=2, size=size) for i in range(n)]
    for s in range(0, n, BATCH):
        chunk = recs[s:s + BATCH]
        views = [[sw.render(v, size) for v in scenes] for _, _, scenes in chunk]
        if captions == "scene":
            plain = [sw.prompt(without_appearance(sc[0])) for _, _, sc in chunk]
            named = [sw.prompt(sc[0]) for _, _, sc in chunk]
        else:
            plain = [sw.subject_caption(sub) for _, sub, _ in chunk]
            named = [sw.subject_phrase(sub) for _, sub, _ in chunk]
        out.append(dict(image=np.stack([v[0][0] for v in views]).astype(np.float32) / 127.5 - 1.0,
                        ref={cut: np.stack([reference(v[1][0], v[1][1][0], cut, side) for v in views])
                             for cut in (False, True)},
                        plain=plain, named=named))
    return out


def main(argv) -> None:
    del argv
    c = FLAGS.config
    if c is None or c.variant != "shapeworld":
        raise app.UsageError("--config must be a ShapeWorld config, e.g. configs/realcustompp.py:shapeworld")
    base = build(c)
    frozen, random_train = trainer.split(base)
    loss = jitted_objective(base)
    data = batches(FLAGS.objects, int(c.train.image_size), int(reference_size(c)), FLAGS.captions)
    ids = lambda caps: tuple(jnp.asarray(tokenize(t, caps)) for t in base.pipe.tokenizers)

    def run(train, cut: bool, caption: str, cfg) -> np.ndarray:
        vals = []
        for i, b in enumerate(data):
            db = {"image": jnp.asarray(b["image"]), "reference": jnp.asarray(b["ref"][cut]), "ids": ids(b[caption])}
            vals += [loss(train, frozen, db, jax.random.key(1000 * i + d), cfg) for d in range(FLAGS.draws)]
        return np.asarray(jnp.stack(vals))

    dropped = run(random_train, False, "plain", DROPPED)

    def gain(x: np.ndarray) -> dict:
        return dict(loss=float(x.mean()), **paired_gain(dropped, x))

    results = {"dropped": dict(loss=float(dropped.mean()), n=len(dropped)),
               "text oracle": gain(run(random_train, False, "named", DROPPED))}
    for name in ["random init", *FLAGS.checkpoint]:
        train = random_train if name == "random init" else trainer.split(load_adapter(base, name))[1]
        for cut in (False, True):
            results[f"{name} | {'cut-out' if cut else 'whole-frame'} reference"] = gain(run(train, cut, "plain", WITH))
    for name, r in results.items():
        print(f"{name}: loss {r['loss']:.4f}" + (f", gain {r['gain']:.4f} +- {r['ci95']:.4f}" if "gain" in r else ""))
    if FLAGS.out:
        dev = jax.devices()[0]
        report = dict(benchmark="appearance_signal", device=dict(kind=dev.device_kind, platform=dev.platform),
                      config=FLAGS["config"].config_filename, captions=FLAGS.captions, objects=FLAGS.objects,
                      draws=FLAGS.draws, example_captions=dict(plain=data[0]["plain"][:3], named=data[0]["named"][:3]),
                      results=results, **git_state())
        Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    define_flags()
    app.run(main)

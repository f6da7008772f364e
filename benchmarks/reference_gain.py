"""Does a trained adapter use its reference? The training objective's loss on fixed batches with the
reference and with the image dropped (visual scale 0: the frozen base alone), on the same noise,
timesteps and captions; gain = dropped - with reference (a useful adapter has a clearly positive
gain; a random one is slightly negative). Batches are taken from the late curriculum (by default
P(multiview) 0.4-1.0, where ShapeWorld captions name the category only), so the appearance can only
come from the reference.

    python benchmarks/reference_gain.py --config configs/realcustompp.py:shapeworld \
        --config.data.examples=16000 --checkpoint runs/sw_pp/export \
        --out benchmarks/results/reference_gain_shapeworld_cpu.json

``--checkpoint`` may repeat; a random-initialised adapter is always measured first as the control.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from ml_collections import config_flags

from customjax import trainer
from customjax.shapeworld.benchmark.loss_gain import DROPPED, WITH, jitted_objective, paired_gain
from customjax.provenance import git_state
from customjax.data.training import make_train_loader
from customjax.methods.build import build, load_adapter, reference_size
from customjax.tokenizer import tokenize

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined on use: tests import this module beside other benchmarks)."""
    config_flags.DEFINE_config_file("config", None, "method config file[:variant]", lock_config=False)
    flags.DEFINE_multi_string("checkpoint", [], "adapter folder (adapter.safetensors); may repeat")
    flags.DEFINE_integer("curriculum", 40, "curriculum length (steps) the batches are drawn from")
    flags.DEFINE_integer("skip", 16, "the first batches skipped (early curriculum: mostly text-image pairs)")
    flags.DEFINE_integer("draws", 3, "noise / timestep draws per batch")
    flags.DEFINE_string("out", None, "JSON results file")

def gain(loss, frozen, train, batches: list[dict], draws: int) -> dict:
    """Mean loss with the reference and dropped, and the gain with its 95% interval, of the adapter
    weights ``train`` (``loss``: the jitted objective, compiled once for every adapter)."""
    on, off = [], []
    for i, b in enumerate(batches):
        for s in range(draws):
            key = jax.random.key(1000 * i + s)
            on.append(loss(train, frozen, b, key, WITH))
            off.append(loss(train, frozen, b, key, DROPPED))
    on, off = np.asarray(jnp.stack(on)), np.asarray(jnp.stack(off))      # one transfer, not one per draw
    return dict(with_reference=float(on.mean()), dropped=float(off.mean()), **paired_gain(off, on))


def main(argv) -> None:
    del argv
    c = FLAGS.config
    if c is None:
        raise app.UsageError("--config is required")
    c.train.steps = FLAGS.curriculum
    it = iter(make_train_loader(c, reference_size(c)))
    batches = [next(it) for _ in range(FLAGS.curriculum)][FLAGS.skip:]
    example_captions = [str(x) for x in batches[-1]["caption"][:4]]
    base = build(c)
    frozen, train = trainer.split(base)
    loss = jitted_objective(base)
    batches = [{"image": jnp.asarray(b["image"]), "reference": jnp.asarray(b["reference"]),
                "ids": tuple(jnp.asarray(tokenize(t, list(b["caption"]))) for t in base.pipe.tokenizers)} for b in batches]
    results = {"random init": gain(loss, frozen, train, batches, FLAGS.draws)}
    for ck in FLAGS.checkpoint:     # an adapter changes only the trainable weights
        results[ck] = gain(loss, frozen, trainer.split(load_adapter(base, ck))[1], batches, FLAGS.draws)
    for name, r in results.items():
        print(f"{name}: with reference {r['with_reference']:.4f}, dropped {r['dropped']:.4f}, "
              f"gain {r['gain']:.4f} +- {r['ci95']:.4f} (n={r['n']})")
    if FLAGS.out:
        dev = jax.devices()[0]
        report = dict(benchmark="reference_gain", device=dict(kind=dev.device_kind, platform=dev.platform),
                      config=FLAGS["config"].config_filename, curriculum=FLAGS.curriculum, skip=FLAGS.skip,
                      draws=FLAGS.draws, example_captions=example_captions,
                      results=results, **git_state())
        Path(FLAGS.out).parent.mkdir(parents=True, exist_ok=True)
        Path(FLAGS.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    define_flags()
    app.run(main)

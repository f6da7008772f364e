"""The tiny training config of the tests and a runner of the real ``customjax.train.train`` on it;
imported by tests and run as a subprocess (simulated devices, several processes with
``jax.distributed``)."""

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(method="realcustompp"):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / f"{method}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.objective.p_drop_text = c.objective.p_drop_image = c.objective.p_drop_both = 0.2
    return c


def run_config(steps=3, fsdp=1, preview_every=0, method="realcustompp"):
    """``tiny`` for ``steps`` steps on 16 synthetic examples without target flips: EMA on, logs every
    step, synchronous saves (at the end only), previews every ``preview_every`` steps with a cheap
    2-step sampler, every parameter of at least 256 elements split over ``fsdp``
    (``train.fsdp_min_size``). Shared by the tests of ``customjax.train`` (one compiled step)."""
    c = tiny_config(method)
    c.train.steps, c.train.log_every, c.train.save_every, c.train.async_save = steps, 1, 1000, False
    c.train.ema_decay, c.train.preview_every = 0.9, preview_every
    c.train.fsdp, c.train.fsdp_min_size = fsdp, 256
    c.data.examples = 16
    c.data.hflip = False        # no target augmentation: a precomputed-latents run is comparable
    c.sample.steps = 2          # a cheap preview sampler (guided throughout: t_stop 5 > 2)
    return c


def objective_inputs(batch=4):
    """(built, frozen tree, trainable tree, one device batch) of :func:`tiny_config`, for tests that call
    the objective (``customjax.methods.objective.loss_fn``) directly."""
    import jax.numpy as jnp

    from customjax import trainer
    from customjax.methods.build import build
    from customjax.tokenizer import tokenize

    built = build(tiny_config())
    frozen, train = trainer.split(built)
    b = next(batches(1, batch))
    return built, frozen, train, {"image": jnp.asarray(b["image"]), "reference": jnp.asarray(b["reference"]),
                                  "ids": tuple(jnp.asarray(tokenize(t, b["caption"])) for t in built.pipe.tokenizers)}


def batches(n, batch, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield {"image": rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32),
               "reference": rng.uniform(0, 1, (batch, 56, 56, 3)).astype(np.float32),
               "caption": ["a red toy on a blue mat"] * batch}


def run(workdir, steps=3, fsdp=1, term_at=None, method="realcustompp"):
    """``customjax.train.train`` of :func:`run_config` in ``workdir`` (resuming what is there).
    ``term_at`` (process, step): that process sends itself SIGTERM after that step. Returns
    train's result plus the process count."""
    from customjax import train

    sent = []

    def on_step(step):
        if term_at is not None and tuple(term_at) == (jax.process_index(), step):
            os.kill(os.getpid(), signal.SIGTERM)
            sent.append(step)
        if sent:   # after the signal, every step waits: the notice and JAX's agreed stop step must reach the
            time.sleep(2)   # other process before the run can end (on a loaded machine that took > 2 steps)

    out = train.train(run_config(steps, fsdp, method=method), str(workdir), on_step=on_step)
    return dict(out, processes=jax.process_count(), devices=jax.device_count())


def exported(workdir) -> dict:
    from customjax.weights.safetensors_io import load_file
    return load_file(Path(workdir) / "export" / "adapter.safetensors")


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    if args.get("distributed"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args["coordinator"], args["num_processes"], args["process_id"])
    out = run(args["workdir"], steps=args["steps"], fsdp=args.get("fsdp", 1), term_at=args.get("term_at"),
              method=args.get("method", "realcustompp"))
    print(json.dumps(out))

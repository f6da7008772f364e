"""Runs a few adapter train steps on the tiny config and prints the trainable parameters' digest;
imported by tests and run as a subprocess (simulated devices, several processes)."""

import importlib.util
import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def tiny_config(method="realcustompp"):
    spec = importlib.util.spec_from_file_location("cfg", ROOT / "configs" / f"{method}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config("tiny")
    c.objective.p_drop_text = c.objective.p_drop_image = c.objective.p_drop_both = 0.2
    return c


def batches(n, batch, seed=0):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        yield {"image": rng.uniform(-1, 1, (batch, 32, 32, 3)).astype(np.float32),
               "reference": rng.uniform(0, 1, (batch, 56, 56, 3)).astype(np.float32),
               "caption": ["a red toy on a blue mat"] * batch}


def run(steps=3, fsdp=1, batch=4, method="realcustompp", process_slice=None):
    """Trains ``steps`` steps; returns the flat trainable parameters as numpy. With
    ``process_slice`` (index, count) each process feeds its part of every global batch."""
    from flax import traverse_util

    from customjax import parallel, trainer
    from customjax.methods.build import build
    from customjax.methods.objective import ObjectiveConfig
    from customjax.tokenizer import tokenize

    c = tiny_config(method)
    built = build(c)
    frozen, train = trainer.split(built)
    tx = trainer.make_optimizer(c.optim)
    state = trainer.init_state(train, tx, jax.random.key(0), ema=True)
    mesh = parallel.make_mesh(fsdp)
    step = trainer.make_train_step(built, tx, ObjectiveConfig(**c.objective), 0.9)
    f = None
    for b in batches(steps, batch):
        ids = tuple(tokenize(t, b["caption"]) for t in built.pipe.tokenizers)
        arrays = {"image": b["image"], "reference": b["reference"], "ids": ids}
        if process_slice is not None:
            i, n = process_slice
            per = batch // n
            local = jax.tree_util.tree_map(lambda a: a[i * per:(i + 1) * per], arrays)
            shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct((batch,) + a.shape[1:], a.dtype), arrays)
            sh = jax.tree_util.tree_map(lambda s: jax.sharding.NamedSharding(mesh, parallel.batch_spec(len(s.shape))), shapes)
            arrays = jax.tree_util.tree_map(
                lambda a, s, full: jax.make_array_from_process_local_data(s, a, full.shape), local, sh, shapes)
        if f is None:
            shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), arrays)
            f, ssh, fsh, bsh = trainer.compile_step(step, mesh, state, frozen, shapes, min_size=256)
            state, frozen = trainer.place(state, ssh), trainer.place(frozen, fsh)
        if process_slice is None:
            arrays = trainer.place(arrays, bsh)
        state, metrics = f(state, frozen, arrays)
    params = jax.tree_util.tree_map(lambda a: np.asarray(jax.experimental.multihost_utils.process_allgather(a, tiled=True))
                                    if process_slice is not None else np.asarray(a), state.params)
    return {"/".join(k): v for k, v in traverse_util.flatten_dict(params).items()}, float(metrics["loss"])


if __name__ == "__main__":
    args = json.loads(sys.argv[1])
    if args.get("distributed"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(args["coordinator"], args["num_processes"], args["process_id"])
        args["process_slice"] = (jax.process_index(), jax.process_count())
    import jax.experimental.multihost_utils  # noqa: F401
    params, loss = run(steps=args["steps"], fsdp=args.get("fsdp", 1), process_slice=args.get("process_slice"))
    np.savez(args["out"], **params)
    print(json.dumps({"loss": loss, "devices": jax.device_count(), "processes": jax.process_count()}))

"""Adapter training for RealCustom / RealCustom++: ``python -m customjax.train``.

    python -m customjax.train --config configs/realcustompp.py:tiny --workdir runs/tiny
    python -m customjax.train --config configs/realcustompp.py:sdxl --workdir gs://bucket/run \
        --config.model.path /weights/sdxl --config.data.text_image /data/laion --config.train.fsdp 4

The same code runs on one CPU, N devices of one host and several hosts (``--distributed`` calls
``jax.distributed.initialize()``; every process runs this command). The run resumes from the
latest checkpoint in ``workdir``; SIGTERM (TPU preemption) saves one and exits. Writes
``workdir/config.json``, TensorBoard events (``workdir/tb``), ``workdir/metrics.jsonl``,
checkpoints (``workdir/checkpoints``), preview samples with their masks every
``train.preview_every`` steps (``workdir/previews``, TensorBoard ``preview/*``; see
:mod:`customjax.preview`) and, at the end, ``workdir/export/adapter.safetensors`` (sample from it
with ``python -m customjax.sample --checkpoint workdir/export``).

``--config.data.latents DIR`` trains on VAE latents precomputed by ``python -m
customjax.data.precompute`` (no VAE encoder in the step; the target is the unaugmented centre crop).
"""

from __future__ import annotations

import dataclasses
import json
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags, logging
from jax.sharding import NamedSharding
from ml_collections import config_flags
from tqdm import tqdm

from customjax import parallel, trainer
from customjax.checkpoint import Checkpointer, write_config
from customjax.data.loader import make_train_loader
from customjax.methods.build import build
from customjax.methods.objective import ObjectiveConfig
from customjax.preview import make_preview
from customjax.tokenizer import tokenize

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined on use, so that importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "method config file[:variant]", lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder (checkpoints, logs, export)", required=True)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-process runs)")
    flags.DEFINE_integer("stop_after", None, "exit (with a checkpoint) after this many steps of this run; for tests")



class _Preempted:
    """Set by SIGTERM; the loop saves and exits at the next step boundary."""

    flag = False

    @classmethod
    def install(cls) -> None:
        signal.signal(signal.SIGTERM, lambda *_: setattr(cls, "flag", True))


def _metrics_writer(workdir: Path):
    if jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events (metrics.jsonl is still written)")
        return None
    return SummaryWriter(str(workdir / "tb"))


def to_device_batch(batch: dict, tokenizers, mesh) -> dict:
    """numpy batch (image or precomputed latent_mean / latent_logvar, reference, caption) -> sharded
    arrays with token ids per tokenizer."""
    ids = tuple(tokenize(t, [str(c) for c in batch["caption"]]) for t in tokenizers)
    arrays = {"reference": np.asarray(batch["reference"], np.float32), "ids": ids}
    if "latent_mean" in batch:  # stored dtype (float16 halves the transfer); loss_fn casts
        arrays.update(latent_mean=np.asarray(batch["latent_mean"]), latent_logvar=np.asarray(batch["latent_logvar"]))
    else:
        arrays["image"] = np.asarray(batch["image"], np.float32)
    if jax.process_count() == 1:
        return parallel.shard_batch(arrays, mesh)
    # several processes: each holds its consecutive part of the global batch (the loader's layout)
    return jax.tree_util.tree_map(lambda a: jax.make_array_from_process_local_data(
        NamedSharding(mesh, parallel.batch_spec(a.ndim)), a, (a.shape[0] * jax.process_count(),) + a.shape[1:]),
        arrays)


def train(config, workdir: str, stop_after: int | None = None, on_step=None) -> dict:
    """Runs (or resumes) training; returns the last metrics. ``on_step(step)`` is called after each
    step (tests use it to deliver SIGTERM at a chosen step)."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    write_config(workdir, config)
    built = build(config)
    if config.train.remat:
        built = dataclasses.replace(built, unet=built.unet.clone(remat=True))
    mesh = parallel.make_mesh(config.train.fsdp)
    div = parallel.batch_size_divisor(mesh)
    if config.train.batch % div:
        raise ValueError(f"config.train.batch={config.train.batch} must be a multiple of the {div} batch-sharded devices")
    if config.data.get("latents"):
        from customjax.data.precompute import check_vae
        check_vae(config.data.latents, built.params["vae"])
    frozen, trainable = trainer.split(built)
    tx = trainer.make_optimizer(config.optim)
    state = trainer.init_state(trainable, tx, jax.random.key(config.seed), ema=config.train.ema_decay > 0)
    objective = ObjectiveConfig(**config.objective)
    step_fn = trainer.make_train_step(built, tx, objective, config.train.ema_decay)

    loader = make_train_loader(config)
    first = loader.peek()
    example = to_device_batch(first, built.pipe.tokenizers, mesh)
    shapes = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), example)
    jstep, state_sh, frozen_sh, _ = trainer.compile_step(step_fn, mesh, state, frozen, shapes)
    ckpt = Checkpointer(workdir, config.train.max_to_keep, config.train.async_save)
    start = ckpt.latest_step()
    if start is not None:
        abstract = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sh)
        state, data_state, _ = ckpt.restore(abstract)
        loader.set_state(data_state)
        logging.info("resumed from step %d", start)
    else:
        state = trainer.place(state, state_sh)
    frozen = trainer.place(frozen, frozen_sh)
    start = int(state.step)

    writer = _metrics_writer(workdir)
    preview = make_preview(config, built, mesh, first, workdir, writer)
    if preview is not None:
        preview.compile(_sampling_params(state), frozen)
    _Preempted.install()
    metrics_file = open(workdir / "metrics.jsonl", "a") if jax.process_index() == 0 else None
    total = config.train.steps
    last, t_log, n_log = {}, time.time(), 0
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
    step = start
    try:
        while step < total:
            batch = to_device_batch(next(loader), built.pipe.tokenizers, mesh)
            state, metrics = jstep(state, frozen, batch)
            step += 1
            n_log += 1
            bar.update(1)
            if on_step is not None:
                on_step(step)
            if step % config.train.log_every == 0 or step == total:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}
                dt = time.time() - t_log
                m.update(skipped_records=loader.skips.records, steps_per_s=n_log / dt, examples_per_s_per_device=n_log * config.train.batch / dt / jax.device_count(),
                         lr=float(_lr(config, step)))
                t_log, n_log, last = time.time(), 0, m
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                if metrics_file:
                    metrics_file.write(json.dumps({"step": step, **m}) + "\n")
                    metrics_file.flush()
                if writer:
                    for k, v in m.items():
                        writer.add_scalar(k, v, step)
            if preview is not None and not _Preempted.flag and (step % config.train.preview_every == 0
                                                                 or step == total):
                preview(step, _sampling_params(state), frozen)
            done = step == total or _Preempted.flag or (stop_after is not None and step - start >= stop_after)
            if step % config.train.save_every == 0 or done:
                ckpt.save(step, state, loader.get_state(), {"step": step}, force=True)
            if done:
                break
    finally:
        bar.close()
        ckpt.close()
        loader.close()
        if metrics_file:
            metrics_file.close()
        if writer:
            writer.close()
    if step == total and jax.process_index() == 0:
        from customjax.methods.build import save_adapter, with_trainable
        save_adapter(with_trainable(built, jax.device_get(_sampling_params(state))), workdir / "export")
    if _Preempted.flag:
        logging.warning("SIGTERM: saved step %d and stopped", step)
    return {"step": step, **last}


def _sampling_params(state: trainer.TrainState):
    """The trainable tree to sample with: the EMA when there is one."""
    return state.ema if state.ema is not None else state.params


def _lr(config, step):
    return trainer.make_optimizer_schedule(config.optim)(step)


def main(argv) -> None:
    del argv
    if FLAGS.distributed:
        jax.distributed.initialize()
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/realcustompp.py:tiny")
    out = train(FLAGS.config, FLAGS.workdir, FLAGS.stop_after)
    print(json.dumps(out))


if __name__ == "__main__":
    define_flags()
    app.run(main)

"""Adapter training for any registered method (``config.method``): ``python -m customjax.train``.

    python -m customjax.train --config configs/realcustompp.py:tiny --workdir runs/tiny
    python -m customjax.train --config configs/realcustompp.py:sdxl --workdir gs://bucket/run \
        --config.model.path /weights/sdxl --config.data.text_image /data/laion --config.train.fsdp 4

The same code runs on one CPU, N devices of one host and several hosts (``--distributed`` calls
``jax.distributed.initialize()``; every process runs this command). The run resumes from the
latest checkpoint in ``workdir``; SIGTERM (TPU preemption) saves one and exits (several processes:
JAX's preemption sync service picks one step at which all of them save). ``workdir`` is an
``etils.epath`` path: local or a bucket (``gs://...``; needs epath's file backend, gcsfs or
TensorFlow, as orbax does). Process 0 writes
``workdir/config.json``, TensorBoard events (``workdir/tb``), ``workdir/metrics.jsonl``,
checkpoints (``workdir/checkpoints``), preview samples with their masks every
``train.preview_every`` steps (``workdir/previews``, TensorBoard ``preview/*``; see
:mod:`customjax.preview`) and, at the end, ``workdir/export/adapter.safetensors`` (sample from it
with ``python -m customjax.sample --checkpoint workdir/export``).

``--config.data.latents DIR`` trains on VAE latents precomputed by ``python -m
customjax.data.precompute`` (no VAE encoder in the step; the target is the unaugmented centre crop).
"""

from __future__ import annotations

import json
import signal
import tempfile
import threading
import time

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from tqdm import tqdm

from customjax import parallel, trainer
from customjax.checkpoint import Checkpointer, is_remote, run_path, write_config
from customjax.data.training import make_train_loader
from customjax.methods.build import reference_size
from customjax.preview import make_preview
from customjax.tokenizer import tokenize

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined on use, so that importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "method config file[:variant]", lock_config=True)
    flags.DEFINE_string("workdir", None, "run folder (checkpoints, logs, export)", required=True)
    flags.DEFINE_bool("distributed", False, "call jax.distributed.initialize() (multi-process runs)")
    flags.DEFINE_integer("stop_after", None, "exit (with a checkpoint) after this many steps of this run; for tests")


def _preemption_service() -> bool:
    """Whether JAX's preemption sync service runs (``jax.distributed.initialize`` with
    ``jax_enable_preemption_service``): it catches SIGTERM itself and agrees on a stop step."""
    from jax._src import distributed
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class _Preemption:
    """When to stop for a preemption (SIGTERM). With JAX's preemption service (multi-process runs)
    all processes stop at the step it agrees on (:meth:`Checkpointer.reached_preemption`), so none
    enters the collective save while another runs a step; its SIGTERM notifier must keep the
    signal. Without it (one process), a SIGTERM handler sets a flag, read at the next step; the
    previous handler is restored by :meth:`close`."""

    def __init__(self, ckpt: Checkpointer):
        self.ckpt, self.flag, self.service = ckpt, False, _preemption_service()
        self._installed, self._previous = False, None
        if not self.service and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handler)
            self._installed = True

    def _handler(self, signum, frame) -> None:
        self.flag = True

    def reached(self, step: int) -> bool:
        """Call at every step, on every process."""
        return self.ckpt.reached_preemption(step) if self.service else self.flag

    def close(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
            self._installed = False


class _JsonLines:
    """``metrics.jsonl``, appended to (a bucket cannot append: there the file is rewritten whole)."""

    def __init__(self, path: epath.Path):
        self.path, self.remote = path, is_remote(path)
        if self.remote:
            self.lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        else:
            self.file = open(path, "a")

    def write(self, record: dict) -> None:
        line = json.dumps(record) + "\n"
        if self.remote:
            self.lines.append(line)
            self.path.write_text("".join(self.lines))
        else:
            self.file.write(line)
            self.file.flush()

    def close(self) -> None:
        if not self.remote:
            self.file.close()


def _metrics_writer(workdir: epath.Path):
    if jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events (metrics.jsonl is still written)")
        return None
    return SummaryWriter(str(workdir / "tb"))


def host_batch(batch: dict, tokenizers, needs: tuple[str, ...] = ("reference",)) -> dict:
    """A loader batch (image or precomputed latent_mean / latent_logvar, caption, and what the
    method ``needs``: its reference, ...) -> numpy arrays with token ids per tokenizer (this process's
    part of the global batch); a need the batch lacks is named."""
    missing = [k for k in needs if k not in batch]
    if missing:
        raise ValueError(f"the method reads {missing} from every training batch, but the loader's batches hold "
                         f"{sorted(k for k in batch if not k.startswith('_'))} (check config.data)")
    ids = tuple(tokenize(t, [str(c) for c in batch["caption"]]) for t in tokenizers)
    arrays = {k: np.asarray(batch[k], np.float32) for k in needs}
    arrays["ids"] = ids
    if "mask" in batch:   # the target's subject mask (objective.subject_weight)
        arrays["mask"] = np.asarray(batch["mask"], np.float32)
    if "latent_mean" in batch:  # stored dtype (float16 halves the transfer); loss_fn casts
        arrays.update(latent_mean=np.asarray(batch["latent_mean"]), latent_logvar=np.asarray(batch["latent_logvar"]))
    else:
        arrays["image"] = np.asarray(batch["image"], np.float32)
    return arrays


def to_device_batch(batch: dict, tokenizers, mesh, needs: tuple[str, ...] = ("reference",)) -> dict:
    """A loader batch -> global arrays split over the mesh's batch axes; each process passes its
    consecutive part of the global batch (the loader's layout)."""
    return parallel.shard_batch(host_batch(batch, tokenizers, needs), mesh)


def _export(built, params, folder: epath.Path) -> None:
    from customjax.methods.build import save_adapter, with_trainable
    built = with_trainable(built, params)
    if not is_remote(folder):
        save_adapter(built, folder)
        return
    with tempfile.TemporaryDirectory() as tmp:    # save_adapter writes local files
        local = save_adapter(built, tmp)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / local.name).write_bytes(local.read_bytes())


def train(config, workdir: str, stop_after: int | None = None, on_step=None) -> dict:
    """Runs (or resumes) training; returns the last metrics. ``on_step(step)`` is called after each
    step (tests use it to deliver SIGTERM at a chosen step)."""
    workdir = run_path(workdir)
    if jax.process_index() == 0:
        workdir.mkdir(parents=True, exist_ok=True)
        write_config(workdir, config)
    s = trainer.setup(config)
    built, mesh = s.built, s.mesh
    if config.data.get("latents"):
        from customjax.data.precompute import check_vae
        check_vae(config.data.latents, built.params["vae"])

    loader = make_train_loader(config, reference_size(config))
    first = loader.peek()
    needs = built.method.needs
    jstep, state_sh, frozen_sh = s.compile(parallel.batch_shapes(host_batch(first, built.pipe.tokenizers, needs)))
    ckpt = Checkpointer(workdir, config.train.max_to_keep, config.train.async_save)
    start = ckpt.latest_step()
    if start is not None:
        abstract = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                          s.state, state_sh)
        state, data_state, _ = ckpt.restore(abstract, start)
        loader.set_state(data_state)
        logging.info("resumed from step %d", start)
    else:
        start, state = 0, trainer.place(s.state, state_sh)
    frozen = trainer.place(s.frozen, frozen_sh)
    s.state = s.frozen = None               # the placed copies are the ones in use

    writer = _metrics_writer(workdir)
    preview = make_preview(config, built, mesh, first, workdir, writer)
    if preview is not None:
        preview.compile(_sampling_params(state), frozen)
    preemption = _Preemption(ckpt)
    metrics_file = _JsonLines(workdir / "metrics.jsonl") if jax.process_index() == 0 else None
    total = config.train.steps
    last, t_log, n_log = {}, time.time(), 0
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
    step, preempted = start, False
    try:
        while step < total:
            batch = to_device_batch(next(loader), built.pipe.tokenizers, mesh, needs)
            state, metrics = jstep(state, frozen, batch)
            step += 1
            n_log += 1
            bar.update(1)
            if on_step is not None:
                on_step(step)
            preempted = preemption.reached(step)
            if step % config.train.log_every == 0 or step == total:
                m = {k: float(v) for k, v in jax.device_get(metrics).items()}   # replicated
                dt = time.time() - t_log
                m.update(skipped_records=loader.skips.records, steps_per_s=n_log / dt,
                         examples_per_s_per_device=n_log * config.train.batch / dt / jax.device_count(),
                         lr=s.lr(step))
                t_log, n_log, last = time.time(), 0, m
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                if metrics_file:
                    metrics_file.write({"step": step, **m})
                if writer:
                    for k, v in m.items():
                        writer.add_scalar(k, v, step)
            if preview is not None and not preempted and (step % config.train.preview_every == 0 or step == total):
                preview(step, _sampling_params(state), frozen)
            done = step == total or preempted or (stop_after is not None and step - start >= stop_after)
            if step % config.train.save_every == 0 or done:
                ckpt.save(step, state, loader.get_state(), {"step": step}, force=True)
            if done:
                break
        if step == total:   # every process gathers (the parameters may be split across processes)
            params = parallel.to_host(_sampling_params(state), mesh)
            if jax.process_index() == 0:
                _export(built, params, workdir / "export")
    finally:
        preemption.close()
        bar.close()
        ckpt.close()
        loader.close()
        if metrics_file:
            metrics_file.close()
        if writer:
            writer.close()
    if preempted:
        logging.warning("preemption: saved step %d and stopped", step)
    return {"step": step, **last}


def _sampling_params(state: trainer.TrainState):
    """The trainable tree to sample with: the EMA when there is one."""
    return state.ema if state.ema is not None else state.params


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

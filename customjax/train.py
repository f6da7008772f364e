"""Adapter training for any registered method (``config.method``): ``python -m customjax.train``.

    python -m customjax.train --config configs/realcustompp.py:tiny --workdir runs/tiny
    python -m customjax.train --config configs/realcustompp.py:sdxl --workdir gs://bucket/run \
        --config.model.path /weights/sdxl --config.data.text_image /data/laion --config.train.fsdp 4

The same code runs on one CPU, N devices of one host and several hosts (``--distributed`` calls
``jax.distributed.initialize()``; every process runs this command). The run resumes from the
newest readable checkpoint in ``workdir`` (an unreadable newer one is named and moved aside), with
the config it was trained with (:mod:`customjax.resume`; ``--allow_config_change``); SIGTERM (TPU
preemption) saves one and exits with code 75 (several processes: JAX's preemption sync service picks
one step at which all of them save). A step with a non-finite loss, gradient or update is skipped
on device; more than ``train.max_bad_steps`` in a row stop the run with code 65, the last good
checkpoint kept and nothing exported. Exit codes: :mod:`customjax.cli`. ``workdir`` is an
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
import sys
import tempfile
import threading
import time

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from tqdm import tqdm

from customjax import parallel, resume, trainer
from customjax.base_model import check_config_paths
from customjax.checkpoint import Checkpointer, is_remote, run_path, write_config
from customjax.cli import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USAGE, fail, parse_flags
from customjax.data.generators import GeneratorError
from customjax.data.generators import check_config as check_generator
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
    flags.DEFINE_list("allow_config_change", [], "config keys (or sections ending in '.') that may differ from the "
                      "checkpoint's on resume, beyond the safe ones (customjax.resume.SAFE)")


def _preemption_service() -> bool:
    """Whether JAX's preemption sync service runs (``jax.distributed.initialize`` with
    ``jax_enable_preemption_service``): it catches SIGTERM itself and agrees on a stop step."""
    from jax._src import distributed
    return getattr(distributed.global_state, "preemption_sync_manager", None) is not None


class Preemption:
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


def json_safe(record: dict) -> dict:
    """``record`` with non-finite floats as None (JSON has no NaN)."""
    return {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in record.items()}


class JsonLines:
    """``metrics.jsonl``, appended to (a bucket cannot append: there the file is rewritten whole).
    ``after``: the step the run resumes from; lines of later steps (logged after that checkpoint by
    the interrupted run, to be logged again) are dropped first."""

    def __init__(self, path: epath.Path, after: int = 0):
        self.path, self.remote = path, is_remote(path)
        lines = path.read_text().splitlines(keepends=True) if path.exists() else []
        kept = [ln for ln in lines if ln.strip() and json.loads(ln).get("step", 0) <= after]
        if len(kept) != len(lines):
            path.write_text("".join(kept))
        if self.remote:
            self.lines = kept
        else:
            self.file = open(path, "a")

    def write(self, record: dict) -> None:
        line = json.dumps(json_safe(record)) + "\n"
        if self.remote:
            self.lines.append(line)
            self.path.write_text("".join(self.lines))
        else:
            self.file.write(line)
            self.file.flush()

    def close(self) -> None:
        if not self.remote:
            self.file.close()


def metrics_writer(workdir: epath.Path):
    if jax.process_index() != 0:
        return None
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        logging.warning("tensorboardX is not installed: no TensorBoard events (metrics.jsonl is still written)")
        return None
    return SummaryWriter(str(workdir / "tb"))


def host_batch(batch: dict, tokenizers, needs: tuple[str, ...] = ("reference",), method=None) -> dict:
    """A loader batch (image or precomputed latent_mean / latent_logvar, caption, and what the
    method ``needs``: its reference, ...) -> numpy arrays with token ids per tokenizer (this process's
    part of the global batch), and the ``method``'s host inputs (:meth:`~customjax.methods.protocol.Method.host_inputs`);
    a need the batch lacks is named."""
    missing = [k for k in needs if k not in batch]
    if missing:
        raise ValueError(f"the method reads {missing} from every training batch, but the loader's batches hold "
                         f"{sorted(k for k in batch if not k.startswith('_'))} (check config.data)")
    ids = tuple(tokenize(t, [str(c) for c in batch["caption"]]) for t in tokenizers)
    arrays = {k: np.asarray(batch[k], np.float32) for k in needs}
    arrays["ids"] = ids
    if "mask" in batch:   # the target's subject mask (objective.subject_weight, a method's need)
        arrays["mask"] = np.asarray(batch["mask"], np.float32)
    if method is not None:
        arrays.update(method.host_inputs(batch, tokenizers))
    if "latent_mean" in batch:  # stored dtype (float16 halves the transfer); loss_fn casts
        arrays.update(latent_mean=np.asarray(batch["latent_mean"]), latent_logvar=np.asarray(batch["latent_logvar"]))
    else:
        arrays["image"] = np.asarray(batch["image"], np.float32)
    return arrays


def to_device_batch(batch: dict, tokenizers, mesh, needs: tuple[str, ...] = ("reference",), method=None) -> dict:
    """A loader batch -> global arrays split over the mesh's batch axes; each process passes its
    consecutive part of the global batch (the loader's layout)."""
    return parallel.shard_batch(host_batch(batch, tokenizers, needs, method), mesh)


class Diverged(RuntimeError):
    """Training stopped: more than ``train.max_bad_steps`` consecutive non-finite steps."""


def _export(method, params, folder: epath.Path, step: int) -> None:
    """``folder/adapter.safetensors`` of the trainable tree (host numpy), under the method's export
    names; refused when a tensor is not finite (the divergence guard should make that impossible)."""
    from customjax.methods.build import ADAPTER_FILE
    from customjax.weights.safetensors_io import save_file

    state = method.state_dict(params)
    bad = [k for k, v in state.items() if not np.all(np.isfinite(v))]
    if bad:
        raise Diverged(f"not exporting step {step}: non-finite values in {bad[:5]}")
    meta = {"method": method.name, "step": str(step)}
    if not is_remote(folder):
        folder.mkdir(parents=True, exist_ok=True)
        save_file(state, folder / ADAPTER_FILE, metadata=meta)
        return
    with tempfile.TemporaryDirectory() as tmp:    # save_file writes local files
        save_file(state, f"{tmp}/{ADAPTER_FILE}", metadata=meta)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / ADAPTER_FILE).write_bytes(epath.Path(f"{tmp}/{ADAPTER_FILE}").read_bytes())


def every(step: int, n: int) -> bool:
    """Whether ``step`` is a multiple of ``n`` (0: never)."""
    return bool(n) and step % n == 0


def check_resume(ckpt: Checkpointer, workdir: epath.Path, config, allow_changes=()) -> None:
    """Before anything is written or built: the config recorded by the newest checkpoint whose
    metadata reads (or, for a run of an older version, ``workdir/config.json``) against this run's
    (:mod:`customjax.resume`)."""
    for step in ckpt.all_steps():
        try:
            saved = ckpt.read_meta(step).get("config")
        except Exception:  # noqa: BLE001  (a broken checkpoint: the next older one is asked)
            continue
        if saved is None and (workdir / "config.json").exists():
            saved = json.loads((workdir / "config.json").read_text())
        if saved is not None:
            resume.check(saved, json.loads(config.to_json_best_effort()), step, str(workdir), allow_changes)
        return


def train(config, workdir: str, stop_after: int | None = None, on_step=None, allow_changes=()) -> dict:
    """Runs (or resumes) training; returns the last metrics with ``step`` and ``status``
    ("finished", "preempted" or "stopped" by ``stop_after``). ``on_step(step)`` is called after each
    step (tests use it to deliver SIGTERM at a chosen step). Raises :class:`~customjax.resume.ResumeError`
    (the checkpoint's config differs, before anything is written) and :class:`Diverged` (more than
    ``train.max_bad_steps`` consecutive non-finite steps; the last good checkpoint is kept, nothing
    is exported)."""
    check_config_paths(config)
    check_generator(config)
    workdir = run_path(workdir)
    ckpt = Checkpointer(workdir, config.train.max_to_keep, config.train.async_save)
    check_resume(ckpt, workdir, config, allow_changes)
    t0 = time.time()
    s = trainer.setup(config)
    built, mesh = s.built, s.mesh
    say(f"{config.method} ({config.get('variant', '?')}) built in {time.time() - t0:.0f} s; "
        f"{jax.device_count()} device(s), mesh {dict(mesh.shape)}")
    if config.data.get("latents"):
        from customjax.data.precompute import check_vae
        check_vae(config.data.latents, built.params["vae"])

    loader = make_train_loader(config, reference_size(config), needs=built.method.needs)
    first = loader.peek()
    needs = built.method.needs
    jstep, state_sh, frozen_sh = s.compile(parallel.batch_shapes(host_batch(first, built.pipe.tokenizers, needs,
                                                                           built.method)))
    start = 0
    if ckpt.all_steps():
        abstract = jax.tree_util.tree_map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                                          s.state, state_sh)
        start, state, data_state, _, unreadable = ckpt.restore_readable(abstract)
        for step, err in unreadable:
            logging.error("checkpoint step %d cannot be read (%s); resuming from step %d", step, err, start)
            if jax.process_index() == 0:
                logging.error("moved it aside to %s", ckpt.set_aside(step))
        if unreadable:
            if jax.process_count() > 1:
                from jax.experimental import multihost_utils
                multihost_utils.sync_global_devices("set aside unreadable checkpoints")
            ckpt.manager.reload()
        loader.set_state(data_state)
        say(f"resumed from step {start} of {config.train.steps} ({ckpt.dir})")
    else:
        state = trainer.place(s.state, state_sh)
    frozen = trainer.place(s.frozen, frozen_sh)
    s.state = s.frozen = None               # the placed copies are the ones in use
    saved_config = json.loads(config.to_json_best_effort())
    if jax.process_index() == 0:            # after a successful restore: the intact run's config stays until then
        write_config(workdir, config)

    writer = metrics_writer(workdir)
    preview = make_preview(config, built, mesh, first, workdir, writer)
    if preview is not None:
        t0 = time.time()
        preview.compile(_sampling_params(state), frozen)
        say(f"preview sampler compiled in {time.time() - t0:.0f} s (previews in {workdir / 'previews'})")
    preemption = Preemption(ckpt)
    metrics_file = JsonLines(workdir / "metrics.jsonl", after=start) if jax.process_index() == 0 else None
    total, max_bad = config.train.steps, int(config.train.get("max_bad_steps", 5))
    last, t_log, n_log = {}, time.time(), 0
    bar = tqdm(total=total, initial=start, desc="train", unit="step", disable=jax.process_index() != 0)
    step, status = start, "finished"
    try:
        while step < total:
            batch = to_device_batch(next(loader), built.pipe.tokenizers, mesh, needs, built.method)
            if step == start:
                t0 = time.time()
            state, metrics = jstep(state, frozen, batch)
            if step == start:      # once: the first step compiles the train step
                jax.block_until_ready(metrics)
                say(f"train step compiled and run in {time.time() - t0:.0f} s; {total - start} steps to go")
            step += 1
            n_log += 1
            bar.update(1)
            if on_step is not None:
                on_step(step)
            preempted = preemption.reached(step)
            if every(step, config.train.log_every) or step == total:
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
                if m["bad_steps"] > max_bad:
                    ckpt.wait()
                    raise Diverged(
                        f"training diverged: {int(m['bad_steps'])} consecutive steps up to step {step} had a non-finite "
                        f"loss, gradient or update (lr {m['lr']:.3g}; train.max_bad_steps={max_bad}); they were skipped. "
                        f"The last good checkpoint is step {ckpt.latest_step()} in {ckpt.dir}; nothing was exported.")
            if preview is not None and not preempted and (every(step, config.train.preview_every) or step == total):
                preview(step, _sampling_params(state), frozen)
            done = step == total or preempted or (stop_after is not None and step - start >= stop_after)
            if every(step, config.train.save_every) or done:
                ckpt.save(step, state, loader.get_state(), {"step": step, "config": saved_config}, force=True)
            if done:
                status = "finished" if step == total else ("preempted" if preempted else "stopped")
                break
        if step == total:   # every process gathers (the parameters may be split across processes)
            bad = int(jax.device_get(state.bad))
            if bad > max_bad:
                raise Diverged(f"training diverged: the last {bad} steps up to step {step} were not finite; "
                               f"the last good checkpoint is step {ckpt.latest_step()}; nothing was exported")
            params = parallel.to_host(_sampling_params(state), mesh)
            if jax.process_index() == 0:
                _export(built.method, params, workdir / "export", step)
                say(f"step {step}: loss {last.get('loss', float('nan')):.4f}; exported {workdir / 'export'}")
    finally:
        preemption.close()
        bar.close()
        ckpt.close()
        loader.close()
        if metrics_file:
            metrics_file.close()
        if writer:
            writer.close()
    if status == "preempted":
        logging.warning("preemption: saved step %d and stopped (exit code %d: run the same command to resume)",
                        step, EXIT_PREEMPTED)
    return {"step": step, "status": status, **last}


def say(line: str) -> None:
    """One summary line of a stage on stderr (process 0), above the progress bar."""
    if jax.process_index() == 0:
        tqdm.write(f"customjax.train: {line}", file=sys.stderr)


def _sampling_params(state: trainer.TrainState):
    """The trainable tree to sample with: the EMA when there is one."""
    return state.ema if state.ema is not None else state.params


def main(argv) -> None:
    del argv
    if FLAGS.distributed:
        jax.distributed.initialize()
    if FLAGS.config is None:
        fail("customjax.train", "--config is required, e.g. --config configs/realcustompp.py (the ShapeWorld default) "
             "or configs/realcustompp.py:tiny")
    try:
        out = train(FLAGS.config, FLAGS.workdir, FLAGS.stop_after, allow_changes=FLAGS.allow_config_change)
    except (resume.ResumeError, FileNotFoundError, GeneratorError) as e:
        sys.stderr.write(f"customjax.train: {e}\n")
        sys.exit(EXIT_USAGE)
    except Diverged as e:
        sys.stderr.write(f"customjax.train: {e}\n")
        sys.exit(EXIT_DIVERGED)
    print(json.dumps(json_safe(out)))
    sys.stdout.flush()
    if out["status"] == "preempted":
        sys.exit(EXIT_PREEMPTED)


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags("customjax.train"))

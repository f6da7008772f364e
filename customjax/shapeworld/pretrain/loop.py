"""The one training loop of the pretraining stages: a jitted step (batch split over the mesh's
batch axes, parameters replicated, buffers donated), AdamW with warmup + cosine decay and global
norm clipping, a progress bar, ``metrics.jsonl`` and TensorBoard scalars."""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from pathlib import Path
from typing import Any, Callable

import jax
import numpy as np
import optax
from flax import serialization
from jax.sharding import NamedSharding, PartitionSpec as P
from tqdm import tqdm

from customjax import parallel


@dataclasses.dataclass(frozen=True)
class StageConfig:
    steps: int
    batch: int
    lr: float
    warmup: int = 100
    weight_decay: float = 0.0
    clip_norm: float = 1.0
    log_every: int = 25
    save_every: int = 500     # resumable snapshot of params, optimizer state and step (0 = none)
    ema: float = 0.0          # decay of an exponential moving average of the parameters (0 = none);
                              # when set, the average is what the stage returns
    decay: float = 0.1        # the final learning rate as a fraction of lr (cosine after the warm-up;
                              # 1.0 keeps lr constant)


def optimizer(c: StageConfig) -> optax.GradientTransformation:
    warmup = min(c.warmup, c.steps // 2)
    sched = optax.warmup_cosine_decay_schedule(0.0, c.lr, warmup, max(c.steps, warmup + 1), c.lr * c.decay)
    return optax.chain(optax.clip_by_global_norm(c.clip_norm), optax.adamw(sched, weight_decay=c.weight_decay))


# The first steps are always logged: their losses fingerprint a run (data, initialisation and
# objective), so a rerun of the recorded command can be checked against them cheaply.
FINGERPRINT_STEPS = 3

LossFn = Callable[[Any, Any, dict, jax.Array], tuple[jax.Array, dict]]


def fit(name: str, loss_fn: LossFn, params: Any, frozen: Any, batches: Callable[[int], dict], c: StageConfig,
        workdir: str | Path, *, seed: int = 0, mesh=None, max_steps: int | None = None,
        resume_key: str = "") -> tuple[Any, list[dict]]:
    """Trains ``params`` for ``c.steps`` steps of ``loss_fn(params, frozen, batch, key) -> (loss,
    aux)`` on ``batches(step)`` (numpy arrays, batch-major); returns the parameters and the logged
    metrics (also in ``workdir/name/metrics.jsonl`` and its TensorBoard events). ``max_steps`` stops
    early (same schedule): a rerun of a run's first steps. With ``c.ema`` the returned parameters
    are the moving average (Polyak averaging, as diffusion models are sampled from). Every ``c.save_every`` steps a snapshot
    (parameters, optimizer state, step) is written to ``workdir/name/snapshot.msgpack``; a later
    call with the same ``resume_key`` (what the run depends on) goes on from it."""
    mesh = mesh or parallel.data_mesh()
    tx = optimizer(c)
    rep = NamedSharding(mesh, P())
    params = jax.device_put(params, rep)
    frozen = jax.device_put(frozen, rep)
    opt = jax.jit(tx.init, out_shardings=rep)(params)
    # The average rides in the optimizer-state slot, so snapshots and resumption carry it unchanged.
    opt = (opt, jax.tree.map(jax.numpy.copy, params)) if c.ema else opt

    def step(params, opt, frozen, batch, key, i):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch, key)
        state, avg = opt if c.ema else (opt, None)
        updates, state = tx.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        if c.ema:
            d = jax.numpy.minimum(c.ema, (1.0 + i) / (10.0 + i))    # the usual warm-up of the decay
            state = (state, jax.tree.map(lambda a, p: d * a + (1.0 - d) * p, avg, params))
        return params, state, dict(aux, loss=loss, grad_norm=optax.global_norm(grads))

    jstep = jax.jit(step, donate_argnums=(0, 1))
    out = Path(workdir) / name
    out.mkdir(parents=True, exist_ok=True)
    writer = _writer(out)
    snapshot = out / "snapshot.msgpack"
    history, start = [], 0
    raw = serialization.msgpack_restore(snapshot.read_bytes()) if snapshot.is_file() and max_steps is None else None
    if raw is not None and raw.get("resume_key") != resume_key:
        logging.warning("%s belongs to a run with other settings; starting %s from step 0", snapshot, name)
        raw = None
    if raw is not None:      # an interrupted run of this stage: go on from it
        params = jax.device_put(serialization.from_state_dict(params, raw["params"]), rep)
        opt = jax.device_put(serialization.from_state_dict(opt, raw["opt"]), rep)
        start, history = int(raw["step"]), json.loads(raw["history"])
    key = jax.random.key(seed)
    t0 = time.time() - (history[-1]["seconds"] if history else 0.0)   # seconds count on across resumes
    end = c.steps if max_steps is None else min(max_steps, c.steps)
    with open(out / "metrics.jsonl", "a" if start else "w") as log, \
            tqdm(total=c.steps, initial=start, desc=name, unit="step") as bar:
        for i in range(start, end):
            batch = parallel.shard_batch(batches(i), mesh)
            params, opt, m = jstep(params, opt, frozen, batch, jax.random.fold_in(key, i), i)
            bar.update(1)
            if (i + 1) % c.log_every == 0 or i + 1 == c.steps or i < FINGERPRINT_STEPS:
                m = {k: float(v) for k, v in jax.device_get(m).items()}
                m.update(step=i + 1, seconds=round(time.time() - t0, 1))
                history.append(m)
                log.write(json.dumps(m) + "\n")
                log.flush()
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                if writer:
                    for k, v in m.items():
                        writer.add_scalar(f"{name}/{k}", v, i + 1)
            if c.save_every and max_steps is None and (i + 1) % c.save_every == 0 and i + 1 < c.steps:
                tmp = snapshot.with_suffix(".tmp")
                tmp.write_bytes(serialization.msgpack_serialize(
                    {"params": serialization.to_state_dict(jax.device_get(params)),
                     "opt": serialization.to_state_dict(jax.device_get(opt)), "step": i + 1,
                     "history": json.dumps(history), "resume_key": resume_key}))
                tmp.replace(snapshot)   # atomic: an interruption never leaves half a snapshot
    snapshot.unlink(missing_ok=True)
    if writer:
        writer.close()
    return jax.device_get(opt[1] if c.ema else params), history


def _writer(folder: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(folder / "tb"))


def sample_indices(seed: int, step: int, n: int, batch: int) -> np.ndarray:
    """Deterministic batch indices into a pool of ``n`` examples for ``step``."""
    return np.random.default_rng([seed, step]).integers(0, n, batch)


def to_unit(images: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float32 in [-1, 1]."""
    return images.astype(np.float32) / 127.5 - 1.0


"""The adapter train step: one jitted function over a (data, fsdp) mesh.

Frozen parameters (UNet, VAE, text and image encoders) and the trainable tree (the adapter and the
UNet's visual K/V) are separate pytrees; only the trainable tree has optimizer state. AdamW with
linear warmup and cosine decay, global-norm clipping, gradient accumulation (``optax.MultiSteps``)
and an optional EMA of the trainable parameters.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util
from jax.sharding import NamedSharding, PartitionSpec as P

from customjax import parallel
from customjax.methods.build import Built, build, trainable_tree
from customjax.methods.common import abstract
from customjax.methods.objective import ObjectiveConfig, loss_fn
from customjax.tokenizer import tokenize


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any          # the trainable tree
    opt_state: Any
    ema: Any             # EMA of params, or None
    key: jax.Array
    bad: jax.Array       # consecutive steps whose loss, gradients or update were not finite (skipped)
    skipped: jax.Array   # all skipped steps of the run


def make_optimizer_schedule(c: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup, then cosine decay to ``lr * final_lr_ratio`` or constant, indexed by optimizer
    update. ``warmup_steps`` and ``total_steps`` count train steps (micro-batches); with
    ``accumulate = k`` > 1 the optimizer updates once per k steps, so both are divided by k (the
    schedule of update ``n`` is the lr of train steps ``n k .. n k + k - 1``)."""
    k = max(int(c.get("accumulate", 1)), 1)
    warmup, total = -(-int(c.warmup_steps) // k), int(c.total_steps) // k
    if c.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, c.lr, warmup, max(total, warmup + 1),
                                                end_value=c.lr * c.final_lr_ratio)
    elif c.schedule == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, c.lr, warmup), optax.constant_schedule(c.lr)],
                                  [warmup])
    else:
        raise ValueError(f"optim.schedule={c.schedule!r}: use 'cosine' or 'constant'")
    return lr


def make_optimizer(c: ml_collections.ConfigDict, schedule: optax.Schedule | None = None
                   ) -> optax.GradientTransformation:
    """AdamW(lr schedule) after global-norm clipping; ``accumulate`` > 1 wraps it in MultiSteps."""
    lr = make_optimizer_schedule(c) if schedule is None else schedule
    tx = optax.chain(optax.clip_by_global_norm(c.clip_norm),
                     optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay))
    return optax.MultiSteps(tx, c.accumulate) if c.accumulate > 1 else tx


def split(built: Built) -> tuple[dict, dict]:
    """(frozen, trainable): the trainable tree and everything else the objective reads."""
    train = trainable_tree(built)
    unet_train = traverse_util.flatten_dict(train.get("unet", {}))
    frozen_unet = {k: v for k, v in traverse_util.flatten_dict(built.params["unet"]).items() if k not in unet_train}
    frozen = {"unet": traverse_util.unflatten_dict(frozen_unet), "vae": built.params["vae"],
              "text_encoders": built.params["text_encoders"],
              **{k: v for k, v in built.params["image"].items() if k not in train},
              "empty_ids": tuple(jnp.asarray(tokenize(t, [""])) for t in built.pipe.tokenizers)}
    return frozen, train


def init_state(trainable: Any, tx: optax.GradientTransformation, key: jax.Array, ema: bool) -> TrainState:
    copy = jax.tree_util.tree_map(jnp.array, trainable)
    zero = lambda: jnp.zeros((), jnp.int32)  # noqa: E731  (own buffers: the state is donated)
    return TrainState(zero(), trainable, tx.init(trainable), copy if ema else None, key, zero(), zero())


def make_train_step(built: Built, tx: optax.GradientTransformation, objective: ObjectiveConfig,
                    ema_decay: float = 0.0):
    """``step(state, frozen, batch) -> (state, metrics)``, not yet jitted (see :func:`compile_step`).

    The divergence guard, on device and without a host sync: a step whose loss, gradient norm or
    updated parameters are not finite changes nothing but the step counter, the key and the
    counters ``bad`` (consecutive such steps, reset by a good one) and ``skipped`` (all of them), so
    no non-finite value ever reaches the parameters, the optimizer state or the EMA. The host reads
    the counters with the logged metrics (``nonfinite``, ``bad_steps``, ``skipped_steps``) and stops
    the run past ``train.max_bad_steps`` (:mod:`customjax.train`)."""
    own = built.method.objective(built, objective)
    grad_fn = jax.value_and_grad(own or functools.partial(loss_fn, built=built, cfg=objective), has_aux=True)

    def step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
        key, sub = jax.random.split(state.key)
        (loss, metrics), grads = grad_fn(state.params, frozen, batch, jax.random.fold_in(sub, state.step))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        grad_norm, param_norm = optax.tree.norm(grads), optax.tree.norm(params)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
        keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(ok, n, o), new, old)  # noqa: E731
        params, opt_state = keep(params, state.params), keep(opt_state, state.opt_state)
        ema = state.ema
        if ema is not None:
            ema = keep(jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params), ema)
        bad = jnp.where(ok, 0, state.bad + 1).astype(jnp.int32)
        skipped = state.skipped + (~ok).astype(jnp.int32)
        metrics = dict(metrics, grad_norm=grad_norm, param_norm=optax.tree.norm(params),
                       nonfinite=(~ok).astype(jnp.float32), bad_steps=bad, skipped_steps=skipped)
        return TrainState(state.step + 1, params, opt_state, ema, key, bad, skipped), metrics
    return step


def compile_step(step, mesh, state: TrainState, frozen: dict, batch_shapes: dict, min_size: int = 2 ** 18):
    """jit with named shardings: parameters and optimizer state per :func:`parallel.param_spec`,
    batches over ``data`` x ``fsdp`` (as :func:`parallel.shard_batch` places them), metrics
    replicated; the state is donated. Returns ``(jitted step, state shardings, frozen shardings)``."""
    state_sh = parallel.param_shardings(state, mesh, min_size)
    frozen_sh = parallel.param_shardings(frozen, mesh, min_size)
    batch_sh = jax.tree_util.tree_map(lambda a: NamedSharding(mesh, parallel.batch_spec(len(a.shape))), batch_shapes)
    rep = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep),
                   donate_argnums=(0,)), state_sh, frozen_sh


@dataclasses.dataclass
class Setup:
    """What a training run, the train-step benchmark and the tests build from one config."""

    config: ml_collections.ConfigDict
    built: Built                    # remat applied per ``config.train.remat``
    mesh: Any
    frozen: dict                    # host / default-device values; :func:`place` them
    state: TrainState               # initial state (not placed)
    tx: optax.GradientTransformation
    schedule: optax.Schedule        # lr per optimizer update: ``schedule(step // accumulate)``
    step: Any                       # the train step, not jitted (:func:`make_train_step`)
    min_size: int                   # parameters of at least this many elements are split over fsdp

    def compile(self, batch_shapes: dict):
        """:func:`compile_step` of this setup's step for global batch shapes."""
        return compile_step(self.step, self.mesh, self.state, self.frozen, batch_shapes, self.min_size)

    def lr(self, step: int) -> float:
        """The lr of the optimizer update that train step ``step`` belongs to."""
        return float(self.schedule(step // max(int(self.config.optim.accumulate), 1)))


def setup(config: ml_collections.ConfigDict, built: Built | None = None) -> Setup:
    """Builds the model (remat per ``config.train.remat``), the ``(data, fsdp)`` mesh
    (``config.train.fsdp``; ``config.train.batch`` must split over it), the frozen / trainable
    split, the optimizer and the initial state (``config.seed``; EMA when ``config.train.ema_decay``
    > 0); with ``config.model.abstract`` parameters and state are shapes (the real-size traces). ``config.train.fsdp_min_size`` (optional, default 2**18): the smallest parameter split
    over ``fsdp``. ``built``: the config's :func:`build`, when the caller holds it already."""
    built = build(config) if built is None else built
    if config.train.remat:
        built = dataclasses.replace(built, unet=built.unet.clone(remat=True))
    mesh = parallel.make_mesh(config.train.fsdp)
    div = parallel.batch_size_divisor(mesh)
    if config.train.batch % div:
        raise ValueError(f"config.train.batch={config.train.batch} must be a multiple of the {div} batch-sharded devices")
    frozen, trainable = split(built)
    schedule = make_optimizer_schedule(config.optim)
    tx = make_optimizer(config.optim, schedule)
    make = lambda t: init_state(t, tx, jax.random.key(config.seed), ema=config.train.ema_decay > 0)  # noqa: E731
    state = jax.eval_shape(make, trainable) if abstract(config) else make(trainable)
    step = make_train_step(built, tx, ObjectiveConfig(**config.objective), config.train.ema_decay)
    return Setup(config, built, mesh, frozen, state, tx, schedule, step,
                 int(config.train.get("fsdp_min_size", 2 ** 18)))


def place(tree: Any, shardings: Any) -> Any:
    """Puts values that every process holds in full (parameters, states; numpy or jax arrays) onto
    ``shardings``; each process fills only its addressable shards, so this works across hosts too.
    On one process this is ``jax.device_put`` (device arrays move device to device); otherwise each
    value is copied to the host once and its shards cut from that copy."""
    def put(a, s):
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(a), s))
        if jax.process_count() == 1 and (not isinstance(a, jax.Array) or a.is_fully_addressable):
            return jax.device_put(a, s)
        h = np.asarray(a)
        return jax.make_array_from_callback(h.shape, s, lambda idx: h[idx])
    return jax.tree_util.tree_map(put, tree, shardings)

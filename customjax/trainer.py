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
from customjax.methods.build import Built, trainable_tree
from customjax.methods.objective import ObjectiveConfig, loss_fn
from customjax.tokenizer import tokenize


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any          # the trainable tree
    opt_state: Any
    ema: Any             # EMA of params, or None
    key: jax.Array


def make_optimizer_schedule(c: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup, then cosine decay to ``lr * final_lr_ratio`` or constant."""
    if c.schedule == "cosine":
        lr = optax.warmup_cosine_decay_schedule(0.0, c.lr, c.warmup_steps, max(c.total_steps, c.warmup_steps + 1),
                                                end_value=c.lr * c.final_lr_ratio)
    elif c.schedule == "constant":
        lr = optax.join_schedules([optax.linear_schedule(0.0, c.lr, c.warmup_steps), optax.constant_schedule(c.lr)],
                                  [c.warmup_steps])
    else:
        raise ValueError(f"optim.schedule={c.schedule!r}: use 'cosine' or 'constant'")
    return lr


def make_optimizer(c: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """AdamW(lr schedule) after global-norm clipping; ``accumulate`` > 1 wraps it in MultiSteps."""
    lr = make_optimizer_schedule(c)
    tx = optax.chain(optax.clip_by_global_norm(c.clip_norm),
                     optax.adamw(lr, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay))
    return optax.MultiSteps(tx, c.accumulate) if c.accumulate > 1 else tx


def split(built: Built) -> tuple[dict, dict]:
    """(frozen, trainable): the trainable tree and everything else the objective reads."""
    train = trainable_tree(built)
    unet_train = traverse_util.flatten_dict(train["unet"])
    frozen_unet = {k: v for k, v in traverse_util.flatten_dict(built.params["unet"]).items() if k not in unet_train}
    frozen = {"unet": traverse_util.unflatten_dict(frozen_unet), "vae": built.params["vae"],
              "text_encoders": built.params["text_encoders"],
              **{k: v for k, v in built.params["image"].items() if k not in train},
              "empty_ids": tuple(jnp.asarray(tokenize(t, [""])) for t in built.pipe.tokenizers)}
    return frozen, train


def init_state(trainable: Any, tx: optax.GradientTransformation, key: jax.Array, ema: bool) -> TrainState:
    copy = jax.tree_util.tree_map(jnp.array, trainable)
    return TrainState(jnp.zeros((), jnp.int32), trainable, tx.init(trainable), copy if ema else None, key)


def make_train_step(built: Built, tx: optax.GradientTransformation, objective: ObjectiveConfig,
                    ema_decay: float = 0.0):
    """``step(state, frozen, batch) -> (state, metrics)``, not yet jitted (see :func:`compile_step`)."""
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, built=built, cfg=objective), has_aux=True)

    def step(state: TrainState, frozen: dict, batch: dict) -> tuple[TrainState, dict]:
        key, sub = jax.random.split(state.key)
        (loss, metrics), grads = grad_fn(state.params, frozen, batch, jax.random.fold_in(sub, state.step))
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = state.ema
        if ema is not None:
            ema = jax.tree_util.tree_map(lambda e, p: ema_decay * e + (1 - ema_decay) * p, ema, params)
        metrics = dict(metrics, grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
        return TrainState(state.step + 1, params, opt_state, ema, key), metrics
    return step


def compile_step(step, mesh, state: TrainState, frozen: dict, batch_shapes: dict, min_size: int = 2 ** 18):
    """jit with named shardings: parameters and optimizer state per :func:`parallel.param_spec`,
    batches over ``data`` x ``fsdp``, metrics replicated; the state is donated."""
    state_sh = parallel.param_shardings(state, mesh, min_size)
    frozen_sh = parallel.param_shardings(frozen, mesh, min_size)
    batch_sh = jax.tree_util.tree_map(lambda a: NamedSharding(mesh, parallel.batch_spec(len(a.shape))), batch_shapes)
    rep = NamedSharding(mesh, P())
    return jax.jit(step, in_shardings=(state_sh, frozen_sh, batch_sh), out_shardings=(state_sh, rep),
                   donate_argnums=(0,)), state_sh, frozen_sh, batch_sh


def place(tree: Any, shardings: Any) -> Any:
    """Puts host values that every process holds in full (parameters, states) onto ``shardings``;
    each process fills only its addressable shards, so this works across hosts too."""
    def put(a, s):
        a = np.asarray(a) if not isinstance(a, jax.Array) or not a.is_fully_addressable else a
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(a), s))
        return jax.make_array_from_callback(a.shape, s, lambda idx: np.asarray(a[idx]))
    return jax.tree_util.tree_map(put, tree, shardings)

"""What every sampler here shares: the per-step update of DDIM / DPM-Solver++ behind one interface,
and classifier-free guidance."""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from customjax import schedulers as S


@dataclasses.dataclass(frozen=True, eq=False)
class Sampler:
    """A sampler over ``timesteps``: ``state = init(x)``; ``x, state = step(model_out, x, state, i)``."""

    timesteps: np.ndarray
    init: Callable[[jax.Array], Any]
    step: Callable[[jax.Array, jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


SAMPLERS = ("ddim", "ancestral", "dpm++2m", "dpm++2s", "dpm++2s_shifted")


def image_keys(x: jax.Array) -> jax.Array:
    """One PRNG key per image of ``x`` (B, ...), made from the bits of its first two values: a
    stochastic sampler's noise is then fixed by the image's initial noise (its seed) alone, whatever
    its batch neighbours."""
    bits = jax.lax.bitcast_convert_type(x.reshape(x.shape[0], -1)[:, :2].astype(jnp.float32), jnp.uint32)
    return jax.vmap(lambda b: jax.random.fold_in(jax.random.fold_in(jax.random.key(0), b[0]), b[1]))(bits)


def _ancestral_step(table: S.DDIMSchedule, pt: str, out, x, keys, i):
    noise = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, i), x.shape[1:], jnp.float32))(keys)
    return S.ddim_step(table, pt, out, x, i, eta=1.0, noise=noise)[0], keys


def make_sampler(config: S.ScheduleConfig, kind: str, steps: int) -> Sampler:
    """``kind`` is ``"ddim"`` (eta 0), ``"ancestral"`` (DDIM with eta 1, DDPM-like: fresh noise at
    every step, drawn per image from :func:`image_keys`), ``"dpm++2m"``, ``"dpm++2s"`` (singlestep,
    trailing timesteps, diffusers' pairing) or ``"dpm++2s_shifted"`` (the released RealCustom++
    sampler: singlestep with its shifted pairing, ending on the last step's x0 prediction)."""
    pt = config.prediction_type
    if kind == "ddim":
        table = S.ddim_schedule(config, steps)
        return Sampler(np.asarray(table.timesteps), lambda x: (),
                       lambda out, x, st, i: (S.ddim_step(table, pt, out, x, i)[0], st))
    if kind == "ancestral":
        table = S.ddim_schedule(config, steps)
        return Sampler(np.asarray(table.timesteps), image_keys, functools.partial(_ancestral_step, table, pt))
    if kind == "dpm++2m":
        table = S.dpm_solver_schedule(config, steps)
        return Sampler(np.asarray(table.timesteps), S.dpm_solver_init,
                       lambda out, x, st, i: S.dpm_solver_step(table, pt, out, x, st, i))
    if kind in ("dpm++2s", "dpm++2s_shifted"):
        shifted = kind == "dpm++2s_shifted"
        table = S.dpm_single_schedule(config, steps, shifted=shifted, final_x0=shifted)
        return Sampler(np.asarray(table.timesteps), S.dpm_single_init,
                       lambda out, x, st, i: S.dpm_single_step(table, pt, out, x, st, i))
    raise ValueError(f"unknown sampler {kind!r}; use one of {SAMPLERS}")


def cfg_combine(uncond: jax.Array, cond: jax.Array, scale: float) -> jax.Array:
    """Classifier-free guidance: e_u + w (e_c - e_u)."""
    return uncond + scale * (cond - uncond)


@functools.lru_cache(maxsize=16)
def cached_sampler(config: S.ScheduleConfig, kind: str, steps: int) -> Sampler:
    """One Sampler object per setting, so the jit cache (keyed on it) is hit on repeated calls."""
    return make_sampler(config, kind, steps)


def seed_latents(seeds: list[int], shape: tuple[int, ...]) -> np.ndarray:
    """Initial noise (len(seeds), *shape), one independent draw per seed, so an image does not
    depend on its batch neighbours or the batch size."""
    return np.stack([np.asarray(jax.random.normal(jax.random.key(int(s)), shape)) for s in seeds])

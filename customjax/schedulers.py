"""DDPM noise schedules, training targets and deterministic samplers (DDIM, DPM-Solver++ 2M).

Semantics follow the diffusers schedulers that Stable Diffusion checkpoints ship configs for
(``DDIMScheduler`` and ``DPMSolverMultistepScheduler``, diffusers 0.42), so a checkpoint's
``scheduler/scheduler_config.json`` means the same thing here as there.

Notation (VP diffusion): ``x_t = alpha_t * x0 + sigma_t * eps`` with ``alpha_t = sqrt(abar_t)``,
``sigma_t = sqrt(1 - abar_t)`` and ``lambda_t = log(alpha_t / sigma_t)``.

Everything that depends on the number of inference steps is a table built once, in numpy float64
from the float32 ``abar`` (diffusers' values), and handed to the step functions as a NamedTuple
of float32/int32 arrays. Step ``i`` indexes those tables with a (possibly traced) integer, so a
whole sampling loop runs inside ``jax.lax.scan`` / ``fori_loop``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import pathlib
import reprlib
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
PREDICTION_TYPES = ("epsilon", "v_prediction")
TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")
FINAL_SIGMAS_TYPES = ("zero", "sigma_min")

# Settings this module does not implement: a config may carry them only with these values.
_REQUIRED = {
    "trained_betas": None,
    "clip_sample": False,
    "thresholding": False,
    "rescale_betas_zero_snr": False,
    "algorithm_type": "dpmsolver++",
    "solver_order": 2,
    "solver_type": "midpoint",
    "use_karras_sigmas": False,
    "use_exponential_sigmas": False,
    "use_beta_sigmas": False,
    "use_lu_lambdas": False,
    "use_flow_sigmas": False,
    "use_dynamic_shifting": False,
    "variance_type": None,
    "lambda_min_clipped": -math.inf,
}
# Settings that only matter when one of the unsupported settings above is switched on.
_INERT = {"dynamic_thresholding_ratio", "sample_max_value", "clip_sample_range", "flow_shift", "time_shift_type"}


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        raise ValueError(f"unsupported scheduler setting {name}={value!r}; expected one of {choices}")


@dataclasses.dataclass(frozen=True)
class ScheduleConfig:
    """The diffusers scheduler settings DDIM and DPM-Solver++ 2M use; defaults are diffusers'.

    ``timestep_spacing=None`` means the sampler's own diffusers default ("leading" for DDIM,
    "linspace" for DPM-Solver), as when a diffusers scheduler is built ``from_config`` of a
    config that lacks the key (e.g. SD 1.x's PNDM config).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str | None = None
    steps_offset: int = 0
    set_alpha_to_one: bool = True  # DDIM: abar after the last step is 1 (else abar_0)
    final_sigmas_type: str = "zero"  # DPM-Solver: sigma after the last step
    lower_order_final: bool = True  # DPM-Solver: first-order last step when < 15 steps
    euler_at_final: bool = False  # DPM-Solver: always a first-order last step

    def __post_init__(self):
        _choice("beta_schedule", self.beta_schedule, BETA_SCHEDULES)
        _choice("prediction_type", self.prediction_type, PREDICTION_TYPES)
        _choice("timestep_spacing", self.timestep_spacing, TIMESTEP_SPACINGS + (None,))
        _choice("final_sigmas_type", self.final_sigmas_type, FINAL_SIGMAS_TYPES)
        if self.num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps={self.num_train_timesteps!r} must be >= 1")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ScheduleConfig:
        """Reads a diffusers ``scheduler_config.json`` dict.

        Keys of other schedulers are logged and ignored; a setting this module does not
        implement (``clip_sample=True``, ``trained_betas``, ``thresholding=True``, Karras sigmas,
        ...) raises a ``ValueError`` naming the key and value. A missing ``clip_sample`` reads as
        False (``DDIMScheduler``'s class default is True, which latent diffusion never wants).
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        kwargs, ignored = {}, []
        for key, value in d.items():
            if key in fields:
                kwargs[key] = value
            elif key in _REQUIRED:
                if value != _REQUIRED[key]:
                    raise ValueError(
                        f"unsupported scheduler setting {key}={reprlib.repr(value)}; "
                        f"only {key}={_REQUIRED[key]!r} is implemented"
                    )
            elif not key.startswith("_") and key not in _INERT:
                ignored.append(key)
        if ignored:
            log.warning("ignoring scheduler config keys DDIM / DPM-Solver++ do not use: %s", ", ".join(sorted(ignored)))
        return cls(**kwargs)

    @classmethod
    def from_folder(cls, path: str | pathlib.Path) -> ScheduleConfig:
        """Reads ``scheduler_config.json`` from a diffusers ``scheduler/`` folder."""
        file = pathlib.Path(path) / "scheduler_config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no scheduler config at {file}")
        try:
            return cls.from_dict(json.loads(file.read_text()))
        except ValueError as e:
            raise ValueError(f"{file}: {e}") from None


# --------------------------------------------------------------------------------------------
# Training-time schedule (DDPM, Ho et al. 2020)


class NoiseSchedule(NamedTuple):
    """DDPM tables indexed by the integer training timestep ``t`` in ``[0, num_train_timesteps)``."""

    betas: jax.Array  # (T,) float32
    alphas_cumprod: jax.Array  # (T,) float32, abar_t = prod_{s<=t} (1 - beta_s)


def _betas(config: ScheduleConfig) -> np.ndarray:
    """Float32 betas as diffusers builds them (``scaled_linear`` is LDM's, ``squaredcos_cap_v2``
    the GLIDE / improved-DDPM cosine schedule with betas capped at 0.999)."""
    t, b0, b1 = config.num_train_timesteps, config.beta_start, config.beta_end
    if config.beta_schedule == "linear":
        return np.linspace(b0, b1, t).astype(np.float32)
    if config.beta_schedule == "scaled_linear":
        return np.linspace(b0**0.5, b1**0.5, t).astype(np.float32) ** 2
    abar = np.cos((np.arange(t + 1) / t + 0.008) / 1.008 * np.pi / 2) ** 2
    return np.minimum(1.0 - abar[1:] / abar[:-1], 0.999).astype(np.float32)


def _alphas_cumprod(config: ScheduleConfig) -> np.ndarray:
    """Float32 abar_t; the product runs in float64, which reproduces torch's float32 cumprod."""
    return np.cumprod(1.0 - _betas(config), dtype=np.float64).astype(np.float32)


def noise_schedule(config: ScheduleConfig) -> NoiseSchedule:
    """The DDPM beta / abar tables of ``config``."""
    return NoiseSchedule(jnp.asarray(_betas(config)), jnp.asarray(_alphas_cumprod(config)))


def _at(table: jax.Array, t: jax.Array, x: jax.Array) -> jax.Array:
    """``table[t]`` shaped to broadcast against ``x`` (``t`` scalar or indexing x's leading axes)."""
    v = table[t]
    return v.reshape(v.shape + (1,) * (x.ndim - v.ndim))


def add_noise(sched: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """Forward process q(x_t | x0): ``sqrt(abar_t) x0 + sqrt(1 - abar_t) noise``."""
    abar = _at(sched.alphas_cumprod, t, x0)
    return (jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * noise).astype(x0.dtype)


def velocity(sched: NoiseSchedule, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """v-prediction target (Salimans & Ho 2022): ``sqrt(abar_t) noise - sqrt(1 - abar_t) x0``."""
    abar = _at(sched.alphas_cumprod, t, x0)
    return (jnp.sqrt(abar) * noise - jnp.sqrt(1.0 - abar) * x0).astype(x0.dtype)


def target(sched: NoiseSchedule, prediction_type: str, x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """The regression target of a model trained with ``prediction_type``."""
    _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    return noise if prediction_type == "epsilon" else velocity(sched, x0, noise, t)


def _x0_eps(prediction_type: str, model_output, sample, alpha, sigma) -> tuple[jax.Array, jax.Array]:
    _choice("prediction_type", prediction_type, PREDICTION_TYPES)
    if prediction_type == "epsilon":
        return (sample - sigma * model_output) / alpha, model_output
    return alpha * sample - sigma * model_output, alpha * model_output + sigma * sample


def predict_x0_eps(
    sched: NoiseSchedule, prediction_type: str, model_output: jax.Array, sample: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Predicted clean sample and noise ``(x0, eps)`` from a model output at ``x_t = sample``."""
    abar = _at(sched.alphas_cumprod, t, sample)
    return _x0_eps(prediction_type, model_output, sample, jnp.sqrt(abar), jnp.sqrt(1.0 - abar))


# --------------------------------------------------------------------------------------------
# Inference timesteps


def _check_steps(config: ScheduleConfig, n: int) -> None:
    if not 1 <= n <= config.num_train_timesteps:
        raise ValueError(
            f"num_inference_steps={n} must lie in [1, num_train_timesteps={config.num_train_timesteps}]"
        )


def ddim_timesteps(config: ScheduleConfig, num_inference_steps: int) -> np.ndarray:
    """Descending model timesteps of ``DDIMScheduler.set_timesteps`` (default spacing "leading")."""
    _check_steps(config, num_inference_steps)
    n, t = num_inference_steps, config.num_train_timesteps
    spacing = config.timestep_spacing or "leading"
    if spacing == "linspace":
        ts = np.linspace(0, t - 1, n).round()[::-1]
    elif spacing == "leading":
        ts = np.arange(n)[::-1] * (t // n) + config.steps_offset
    else:
        ts = np.round(np.arange(t, 0, -t / n)) - 1
    return ts.astype(np.int64)


def dpm_solver_timesteps(config: ScheduleConfig, num_inference_steps: int) -> np.ndarray:
    """Descending model timesteps of ``DPMSolverMultistepScheduler.set_timesteps`` (default
    spacing "linspace"; ``n + 1`` points with the last one dropped)."""
    _check_steps(config, num_inference_steps)
    n, t = num_inference_steps, config.num_train_timesteps
    spacing = config.timestep_spacing or "linspace"
    if spacing == "linspace":
        ts = np.linspace(0, t - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ts = (np.arange(n + 1) * (t // (n + 1)))[::-1][:-1] + config.steps_offset
    else:
        ts = np.arange(t, 0, -t / n).round() - 1
    return ts.astype(np.int64)


# --------------------------------------------------------------------------------------------
# DDIM (Song et al. 2021, eq. 12; eta > 0: eq. 16)


class DDIMSchedule(NamedTuple):
    """Per-step DDIM tables; step ``i`` moves from ``timesteps[i]`` to ``timesteps[i] - T // N``."""

    timesteps: jax.Array  # (N,) int32, the model's timestep at step i
    alphas: jax.Array  # (N,) sqrt(abar) at timesteps[i]
    sigmas: jax.Array  # (N,) sqrt(1 - abar) at timesteps[i]
    alphas_prev: jax.Array  # (N,) the same after the step
    sigmas_prev: jax.Array  # (N,)
    ancestral: jax.Array  # (N,) sigma_t(eta = 1) = sqrt((1 - abar_prev) / (1 - abar_t) * (1 - abar_t / abar_prev))


def ddim_schedule(config: ScheduleConfig, num_inference_steps: int) -> DDIMSchedule:
    """DDIM tables for ``num_inference_steps``.

    As in diffusers, the step from ``t`` always lands on ``t - num_train_timesteps // N`` (which
    is not the next timestep for "linspace" / uneven "trailing" spacing); a landing point below 0
    takes abar = 1 if ``set_alpha_to_one`` else abar_0.
    """
    abar = _alphas_cumprod(config).astype(np.float64)
    ts = ddim_timesteps(config, num_inference_steps)
    prev = ts - config.num_train_timesteps // num_inference_steps
    final = 1.0 if config.set_alpha_to_one else abar[0]
    abar_t, abar_prev = abar[ts], np.where(prev >= 0, abar[np.maximum(prev, 0)], final)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return DDIMSchedule(
        jnp.asarray(ts, jnp.int32),
        f32(np.sqrt(abar_t)),
        f32(np.sqrt(1.0 - abar_t)),
        f32(np.sqrt(abar_prev)),
        f32(np.sqrt(1.0 - abar_prev)),
        f32(np.sqrt((1.0 - abar_prev) / (1.0 - abar_t) * (1.0 - abar_t / abar_prev))),
    )


def ddim_step(
    ddim: DDIMSchedule, prediction_type: str, model_output: jax.Array, sample: jax.Array, i: jax.Array,
    eta: float = 0.0, noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """One DDIM step from ``sample`` at ``ddim.timesteps[i]`` (Song et al. 2021, Eq. 12): deterministic
    for ``eta = 0``; with ``eta > 0`` it adds ``sigma_t(eta) * noise`` (Eq. 16; ``eta = 1`` is DDPM's
    ancestral step), as diffusers' ``DDIMScheduler.step(eta=..., variance_noise=noise)``.

    Returns ``(prev_sample, x0)``; ``prev_sample`` has ``sample``'s dtype.
    """
    x0, eps = _x0_eps(prediction_type, model_output, sample, ddim.alphas[i], ddim.sigmas[i])
    if not eta:
        prev = ddim.alphas_prev[i] * x0 + ddim.sigmas_prev[i] * eps
        return prev.astype(sample.dtype), x0
    if noise is None:
        raise ValueError(f"ddim_step with eta={eta} needs the step's noise")
    std = eta * ddim.ancestral[i]
    direction = jnp.sqrt(jnp.maximum(ddim.sigmas_prev[i] ** 2 - std ** 2, 0.0))
    prev = ddim.alphas_prev[i] * x0 + direction * eps + std * noise
    return prev.astype(sample.dtype), x0


# --------------------------------------------------------------------------------------------
# DPM-Solver++(2M), data prediction, midpoint (Lu et al. 2022, arXiv:2211.01095, Alg. 2)


class DPMSolverSchedule(NamedTuple):
    """Per-step DPM-Solver++ tables; step ``i`` moves from point ``i`` to point ``i + 1``.

    Point ``N`` is the end of sampling: sigma 0 (alpha 1, lambda +inf) for
    ``final_sigmas_type="zero"``, else the point of timestep 0.
    """

    timesteps: jax.Array  # (N,) int32, the model's timestep at step i
    alphas: jax.Array  # (N + 1,) float32
    sigmas: jax.Array  # (N + 1,) float32
    lambdas: jax.Array  # (N + 1,) float32, log(alpha / sigma)
    first_order: jax.Array  # (N,) bool, steps diffusers forces to first order (the last, at times)


class DPMSolverState(NamedTuple):
    """What a multistep solver carries between steps."""

    prev_x0: jax.Array  # data prediction of the previous step
    has_prev: jax.Array  # () bool, False before the first step


def dpm_solver_schedule(config: ScheduleConfig, num_inference_steps: int) -> DPMSolverSchedule:
    """DPM-Solver++ 2M tables for ``num_inference_steps``.

    The last step is first order when ``final_sigmas_type="zero"``, ``euler_at_final``, or
    ``lower_order_final`` with fewer than 15 steps; the first step is first order for want of
    history (see ``DPMSolverState.has_prev``).
    """
    abar = _alphas_cumprod(config).astype(np.float64)
    ts = dpm_solver_timesteps(config, num_inference_steps)
    n = len(ts)
    abar_end = 1.0 if config.final_sigmas_type == "zero" else abar[0]
    abar_pts = np.append(abar[ts], abar_end)
    alphas, sigmas = np.sqrt(abar_pts), np.sqrt(1.0 - abar_pts)
    with np.errstate(divide="ignore"):
        lambdas = np.log(alphas) - np.log(sigmas)
    first_order = np.zeros(n, bool)
    first_order[-1] = (
        config.final_sigmas_type == "zero" or config.euler_at_final or (config.lower_order_final and n < 15)
    )
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return DPMSolverSchedule(
        jnp.asarray(ts, jnp.int32), f32(alphas), f32(sigmas), f32(lambdas), jnp.asarray(first_order)
    )


def dpm_solver_init(sample: jax.Array) -> DPMSolverState:
    """The solver state before the first step of a loop over ``sample``."""
    dtype = jnp.promote_types(sample.dtype, jnp.float32)
    return DPMSolverState(jnp.zeros(sample.shape, dtype), jnp.zeros((), bool))


def dpm_solver_step(
    dpm: DPMSolverSchedule,
    prediction_type: str,
    model_output: jax.Array,
    sample: jax.Array,
    state: DPMSolverState,
    i: jax.Array,
) -> tuple[jax.Array, DPMSolverState]:
    """One DPM-Solver++(2M) step from ``sample`` at ``dpm.timesteps[i]``.

    ``x_next = (sigma_next / sigma_i) x - alpha_next (exp(-h) - 1) D`` with ``h = lambda_next -
    lambda_i`` and ``D = x0_i + (x0_i - x0_prev) h / (2 h_prev)``, or ``D = x0_i`` for a
    first-order step (no history, or a step in ``dpm.first_order``). Returns
    ``(prev_sample, state)``; ``prev_sample`` has ``sample``'s dtype.
    """
    x0, _ = _x0_eps(prediction_type, model_output, sample, dpm.alphas[i], dpm.sigmas[i])
    x0 = x0.astype(state.prev_x0.dtype)
    h = dpm.lambdas[i + 1] - dpm.lambdas[i]
    h_prev = dpm.lambdas[i] - dpm.lambdas[i - 1]
    # The order is chosen on the scalar coefficient, before it meets an array, so the unused
    # branch (inf at a zero final sigma) never reaches values or gradients.
    first = dpm.first_order[i] | ~state.has_prev
    half_inv_r = jnp.where(first, 0.0, 0.5 * h / h_prev)
    d = x0 + half_inv_r * (x0 - state.prev_x0)
    prev = (dpm.sigmas[i + 1] / dpm.sigmas[i]) * sample - (dpm.alphas[i + 1] * jnp.expm1(-h)) * d
    return prev.astype(sample.dtype), DPMSolverState(x0, jnp.ones((), bool))


# --------------------------------------------------------------------------------------------
# DPM-Solver++(2S), singlestep (Lu et al. 2022, Algorithm 1 with the midpoint update)


class DPMSingleSchedule(NamedTuple):
    """Singlestep DPM-Solver++ tables: ``lambdas`` etc. at the ``n`` model timesteps plus the final
    point; ``orders`` (n,) 1 or 2: an order-2 step finishes the pair that the order-1 step before it
    began (both model outputs, from the sample at the pair's start); ``final_x0``: the last step
    returns the model's x0 prediction instead of the sample at the final point."""

    timesteps: jax.Array  # (n,) int32
    alphas: jax.Array  # (n + 1,)
    sigmas: jax.Array  # (n + 1,)
    lambdas: jax.Array  # (n + 1,)
    orders: jax.Array  # (n,) int32
    final_x0: bool


class DPMSingleState(NamedTuple):
    start: jax.Array  # the sample at the start of the current pair
    prev_x0: jax.Array  # the previous step's x0 prediction


def dpm_single_orders(n: int, shifted: bool = False) -> np.ndarray:
    """Per-step orders. ``shifted=False``: diffusers' ``DPMSolverSinglestepScheduler`` (order 2,
    ``lower_order_final``): pairs (0, 1), (2, 3), ... and a last single step when ``n`` is odd.
    ``shifted=True``: the released RealCustom++ code's list ``[1] + [(i % 2) + 1 for i in
    range(n - 1)]``: step 0 alone, then pairs (1, 2), (3, 4), ..."""
    if shifted:
        return np.array([1] + [(i % 2) + 1 for i in range(n - 1)], np.int32)
    return np.array([(i % 2) + 1 for i in range(n)][: n - 1] + [1 if n % 2 else 2], np.int32)[:n]


def dpm_single_schedule(config: ScheduleConfig, num_inference_steps: int, *, shifted: bool = False,
                        spacing: str = "trailing", final_x0: bool = False) -> DPMSingleSchedule:
    """Tables of the singlestep solver over ``num_inference_steps`` model timesteps, ending at
    t = 0 (abar_0, as the released code's last ``prev_timestep=0``). ``spacing``: ``"trailing"``
    (``arange(T - 1, -1, -T / n).round()``: 999, 959, ..., 39 for 25 steps, the released code's) or
    the config's DPM-Solver spacing (``"config"``)."""
    _check_steps(config, num_inference_steps)
    n, T = num_inference_steps, config.num_train_timesteps
    if spacing == "trailing":
        ts = np.arange(T - 1, -1, -T / n).round().astype(np.int64)[:n]
    elif spacing == "config":
        ts = dpm_solver_timesteps(config, n)
    else:
        raise ValueError(f"spacing={spacing!r}: use 'trailing' or 'config'")
    abar = _alphas_cumprod(config).astype(np.float64)
    pts = np.append(abar[ts], abar[0])
    alphas, sigmas = np.sqrt(pts), np.sqrt(1.0 - pts)
    f32 = lambda a: jnp.asarray(a, jnp.float32)  # noqa: E731
    return DPMSingleSchedule(jnp.asarray(ts, jnp.int32), f32(alphas), f32(sigmas), f32(np.log(alphas) - np.log(sigmas)),
                             jnp.asarray(dpm_single_orders(n, shifted)), final_x0)


def dpm_single_init(sample: jax.Array) -> DPMSingleState:
    dtype = jnp.promote_types(sample.dtype, jnp.float32)
    return DPMSingleState(sample.astype(dtype), jnp.zeros(sample.shape, dtype))


def dpm_single_step(tab: DPMSingleSchedule, prediction_type: str, model_output: jax.Array, sample: jax.Array,
                    state: DPMSingleState, i: jax.Array) -> tuple[jax.Array, DPMSingleState]:
    """One step of singlestep DPM-Solver++ (diffusers' ``singlestep_dpm_solver_{first,second}_order_update``,
    dpmsolver++ / midpoint): order 1 from the current sample, ``x = (sigma_t / sigma_s) x_s - alpha_t
    (exp(-h) - 1) x0``; order 2 from the pair's start s1 with ``D = x0_prev + (x0 - x0_prev) / (2 r0)``,
    ``r0 = (lambda_i - lambda_{i-1}) / h``."""
    x0, _ = _x0_eps(prediction_type, model_output, sample, tab.alphas[i], tab.sigmas[i])
    x0 = x0.astype(state.prev_x0.dtype)
    two = tab.orders[i] == 2
    s = jnp.where(two, i - 1, i)
    start = jnp.where(two, state.start, sample.astype(state.start.dtype))
    h = tab.lambdas[i + 1] - tab.lambdas[s]
    r0 = jnp.where(two, (tab.lambdas[i] - tab.lambdas[s]) / h, 1.0)
    d = jnp.where(two, state.prev_x0 + (x0 - state.prev_x0) / (2.0 * r0), x0)
    prev = (tab.sigmas[i + 1] / tab.sigmas[s]) * start - (tab.alphas[i + 1] * jnp.expm1(-h)) * d
    if tab.final_x0:
        prev = jnp.where(i == len(tab.orders) - 1, x0, prev)
    return prev.astype(sample.dtype), DPMSingleState(start, x0)

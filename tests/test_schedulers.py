"""Parity of customjax.schedulers with the diffusers schedulers built from the same config."""

import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler

from conftest import max_abs
from customjax import schedulers as S

# Stable Diffusion 1.x / 2.x / XL's scheduler_config.json, less the keys irrelevant here.
SD = dict(
    _class_name="PNDMScheduler",
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    set_alpha_to_one=False,
    steps_offset=1,
    clip_sample=False,
    trained_betas=None,
)
SHAPE = (2, 4, 8, 8)
_rng = np.random.default_rng(0)
X_T = _rng.standard_normal(SHAPE).astype(np.float32)
W = _rng.standard_normal(SHAPE).astype(np.float32)
X0, NOISE = _rng.standard_normal((2, 4, 3, 5, 5)).astype(np.float32)  # a batch of 4 for 4 timesteps


def fake_model_jax(x, t):
    return 0.1 * x + jnp.sin(0.01 * t) * W


def fake_model_torch(x, t):
    return 0.1 * x + torch.sin(0.01 * t.float()) * torch.from_numpy(W)


def diffusers_loop(cls, config: dict, n: int, start: int = 0) -> tuple[np.ndarray, np.ndarray]:
    sched = cls.from_config(config)
    sched.set_timesteps(n)
    if start:
        sched.set_begin_index(start)
    x = torch.from_numpy(X_T)
    for t in sched.timesteps[start:]:
        x = sched.step(fake_model_torch(x, t), t, x).prev_sample
    return x.numpy(), sched.timesteps.numpy()


def ddim_loop(cfg: S.ScheduleConfig, n: int) -> tuple[jax.Array, S.DDIMSchedule]:
    ddim = S.ddim_schedule(cfg, n)
    x = jnp.asarray(X_T)
    for i in range(n):
        x, _ = S.ddim_step(ddim, cfg.prediction_type, fake_model_jax(x, ddim.timesteps[i]), x, i)
    return x, ddim


def dpm_loop(cfg: S.ScheduleConfig, n: int, start: int = 0) -> tuple[jax.Array, S.DPMSolverSchedule]:
    dpm = S.dpm_solver_schedule(cfg, n)
    x = jnp.asarray(X_T)
    state = S.dpm_solver_init(x)
    for i in range(start, n):
        x, state = S.dpm_solver_step(dpm, cfg.prediction_type, fake_model_jax(x, dpm.timesteps[i]), x, state, i)
    return x, dpm


@pytest.mark.parametrize(
    "overrides",
    [
        dict(beta_schedule="linear", beta_start=0.0001, beta_end=0.02),
        dict(beta_schedule="scaled_linear"),
        dict(beta_schedule="squaredcos_cap_v2"),
    ],
    ids=lambda o: o["beta_schedule"],
)
def test_alphas_cumprod_match_diffusers(report, overrides):
    config = {**SD, **overrides}
    ref = DDIMScheduler.from_config(config)
    sched = S.noise_schedule(S.ScheduleConfig.from_dict(config))
    assert sched.alphas_cumprod.dtype == jnp.float32
    report(f"betas {overrides['beta_schedule']}", max_abs(sched.betas, ref.betas), 1e-7)
    report(f"alphas_cumprod {overrides['beta_schedule']}", max_abs(sched.alphas_cumprod, ref.alphas_cumprod), 1e-6)


def test_add_noise_velocity_and_targets_match_diffusers(report):
    ref = DDIMScheduler.from_config(SD)
    sched = S.noise_schedule(S.ScheduleConfig.from_dict(SD))
    x0, noise = X0, NOISE
    t = np.array([0, 10, 500, 999])
    tt = torch.from_numpy(t)
    ref_noisy = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), tt)
    ref_v = ref.get_velocity(torch.from_numpy(x0), torch.from_numpy(noise), tt)
    report("add_noise", max_abs(S.add_noise(sched, x0, noise, t), ref_noisy), 1e-6)
    report("velocity", max_abs(S.velocity(sched, x0, noise, t), ref_v), 1e-6)
    report("target v_prediction", max_abs(S.target(sched, "v_prediction", x0, noise, t), ref_v), 1e-6)
    assert S.target(sched, "epsilon", x0, noise, t) is noise
    # a scalar timestep applies to the whole batch
    ref_500 = ref.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.full((4,), 500))
    report("add_noise scalar t", max_abs(S.add_noise(sched, x0, noise, 500), ref_500), 1e-6)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predict_x0_eps_inverts_the_forward_process(report, prediction_type):
    sched = S.noise_schedule(S.ScheduleConfig.from_dict(SD))
    x0, noise, t = jnp.asarray(X0), jnp.asarray(NOISE), jnp.array([0, 10, 500, 999])
    x_t = S.add_noise(sched, x0, noise, t)
    out = S.target(sched, prediction_type, x0, noise, t)
    pred_x0, pred_eps = S.predict_x0_eps(sched, prediction_type, out, x_t, t)
    report(f"predict x0 ({prediction_type})", max_abs(pred_x0, x0), 1e-4)
    report(f"predict eps ({prediction_type})", max_abs(pred_eps, noise), 1e-4)


@pytest.mark.parametrize(
    "n, overrides",
    [
        (10, {}),
        (50, {}),
        (10, dict(prediction_type="v_prediction")),
        (50, dict(prediction_type="v_prediction", timestep_spacing="trailing")),
        (10, dict(timestep_spacing="trailing")),
        (50, dict(timestep_spacing="linspace")),
        (10, dict(beta_schedule="squaredcos_cap_v2", set_alpha_to_one=True, steps_offset=0)),
        (7, dict(timestep_spacing="trailing", prediction_type="v_prediction")),
    ],
)
def test_ddim_loop_matches_diffusers(report, n, overrides):
    config = {**SD, **overrides}
    ref, ref_ts = diffusers_loop(DDIMScheduler, config, n)
    x, ddim = ddim_loop(S.ScheduleConfig.from_dict(config), n)
    np.testing.assert_array_equal(ddim.timesteps, ref_ts)
    report(f"DDIM {n} steps {overrides}", max_abs(x, ref), 1e-4)


@pytest.mark.parametrize(
    "n, overrides",
    [
        (10, {}),
        (7, dict(timestep_spacing="trailing", prediction_type="v_prediction", beta_schedule="squaredcos_cap_v2")),
    ],
)
def test_ddim_eta_one_matches_diffusers_with_the_same_noise(report, n, overrides):
    """The ancestral (eta = 1) DDIM step, given the noise diffusers is given as ``variance_noise``."""
    config = {**SD, **overrides}
    noises = _rng.standard_normal((n,) + SHAPE).astype(np.float32)
    ref = DDIMScheduler.from_config(config)
    ref.set_timesteps(n)
    want = torch.from_numpy(X_T)
    for k, t in enumerate(ref.timesteps):
        want = ref.step(fake_model_torch(want, t), t, want, eta=1.0, variance_noise=torch.from_numpy(noises[k])).prev_sample
    cfg = S.ScheduleConfig.from_dict(config)
    ddim = S.ddim_schedule(cfg, n)
    x = jnp.asarray(X_T)
    for i in range(n):
        x, _ = S.ddim_step(ddim, cfg.prediction_type, fake_model_jax(x, ddim.timesteps[i]), x, i, eta=1.0,
                           noise=jnp.asarray(noises[i]))
    report(f"DDIM eta=1 {n} steps {overrides}", max_abs(x, want.numpy()), 1e-4)
    deterministic, _ = ddim_loop(cfg, n)
    assert max_abs(x, deterministic) > 0.1          # the noise is used
    with pytest.raises(ValueError, match="needs the step's noise"):
        S.ddim_step(ddim, cfg.prediction_type, x, x, 0, eta=1.0)


def test_ancestral_sampler_noise_follows_each_image_alone():
    """An image's trajectory depends on its own initial noise, not on its batch neighbours."""
    from customjax.sampling.common import make_sampler

    cfg = S.ScheduleConfig.from_dict({**SD, "prediction_type": "v_prediction"})
    smp = make_sampler(cfg, "ancestral", 6)
    model = lambda x, t: 0.1 * x + jnp.sin(0.01 * t) * W[0]      # noqa: E731  the same for every image

    @jax.jit
    def run(x):
        def body(i, carry):
            x, st = carry
            return smp.step(model(x, jnp.asarray(smp.timesteps)[i]), x, st, i)
        return jax.lax.fori_loop(0, len(smp.timesteps), body, (x, smp.init(x)))[0]

    x = jnp.asarray(X_T)
    out = run(x)
    alone = run(x[1:])
    np.testing.assert_allclose(out[1:], alone, atol=1e-6)
    swapped = run(x[::-1])
    np.testing.assert_allclose(swapped[::-1], out, atol=1e-6)
    ddim = make_sampler(cfg, "ddim", 6)
    det = jax.lax.fori_loop(0, 6, lambda i, c: ddim.step(model(c[0], jnp.asarray(ddim.timesteps)[i]), c[0], c[1], i),
                            (x, ddim.init(x)))[0]
    assert max_abs(out, det) > 0.1
    with pytest.raises(ValueError, match="unknown sampler 'euler'"):
        make_sampler(cfg, "euler", 6)


@pytest.mark.parametrize(
    "n, overrides",
    [
        (10, {}),
        (25, {}),
        (10, dict(prediction_type="v_prediction")),
        (25, dict(prediction_type="v_prediction")),
        (1, {}),
        (20, dict(timestep_spacing="leading")),  # SDXL's config sets "leading"
        (12, dict(timestep_spacing="trailing", prediction_type="v_prediction")),
        (10, dict(final_sigmas_type="sigma_min")),  # lower_order_final: first-order last step
        (20, dict(final_sigmas_type="sigma_min")),  # >= 15 steps: second-order last step
    ],
)
def test_dpm_solver_loop_matches_diffusers(report, n, overrides):
    config = {**SD, **overrides}
    ref, ref_ts = diffusers_loop(DPMSolverMultistepScheduler, config, n)
    x, dpm = dpm_loop(S.ScheduleConfig.from_dict(config), n)
    np.testing.assert_array_equal(dpm.timesteps, ref_ts)
    report(f"DPM-Solver++ 2M {n} steps {overrides}", max_abs(x, ref), 1e-4)


def test_dpm_solver_loop_started_midway_matches_diffusers(report):
    """img2img-style: the first step taken is first order wherever it starts."""
    ref, _ = diffusers_loop(DPMSolverMultistepScheduler, SD, 10, start=4)
    x, _ = dpm_loop(S.ScheduleConfig.from_dict(SD), 10, start=4)
    report("DPM-Solver++ 2M steps 4..9 of 10", max_abs(x, ref), 1e-4)


def test_dpm_solver_last_step_order():
    cfg = S.ScheduleConfig.from_dict({**SD, "final_sigmas_type": "sigma_min"})
    assert bool(S.dpm_solver_schedule(cfg, 14).first_order[-1])
    assert not bool(S.dpm_solver_schedule(cfg, 15).first_order[-1])
    assert bool(S.dpm_solver_schedule(S.ScheduleConfig.from_dict(SD), 25).first_order[-1])  # sigma 0


@jax.jit
def ddim_scan(ddim: S.DDIMSchedule, x: jax.Array) -> jax.Array:
    def body(x, i):
        return S.ddim_step(ddim, "v_prediction", fake_model_jax(x, ddim.timesteps[i]), x, i)[0], None

    return jax.lax.scan(body, x, jnp.arange(ddim.timesteps.shape[0]))[0]


@jax.jit
def dpm_scan(dpm: S.DPMSolverSchedule, x: jax.Array) -> jax.Array:
    def body(carry, i):
        x, state = carry
        return S.dpm_solver_step(dpm, "v_prediction", fake_model_jax(x, dpm.timesteps[i]), x, state, i), None

    return jax.lax.scan(body, (x, S.dpm_solver_init(x)), jnp.arange(dpm.timesteps.shape[0]))[0][0]


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_jitted_scan_matches_python_loop(report, sampler):
    cfg = S.ScheduleConfig.from_dict({**SD, "prediction_type": "v_prediction"})
    loop, scan = (ddim_loop, ddim_scan) if sampler == "ddim" else (dpm_loop, dpm_scan)
    expected, tables = loop(cfg, 20)
    report(f"{sampler} jit(scan) vs python loop", max_abs(scan(tables, jnp.asarray(X_T)), expected), 1e-5)


def test_dpm_solver_gradient_is_finite():
    cfg = S.ScheduleConfig.from_dict(SD)
    dpm = S.dpm_solver_schedule(cfg, 5)

    def loss(x):
        state = S.dpm_solver_init(x)
        for i in range(5):
            x, state = S.dpm_solver_step(dpm, cfg.prediction_type, fake_model_jax(x, dpm.timesteps[i]), x, state, i)
        return jnp.sum(x**2)

    assert bool(jnp.all(jnp.isfinite(jax.grad(loss)(jnp.asarray(X_T)))))


@pytest.mark.parametrize("n,shifted", [(25, True), (25, False), (6, False), (7, True)])
def test_dpm_singlestep_matches_diffusers(report, n, shifted):
    """Singlestep DPM-Solver++(2) (midpoint) against diffusers' DPMSolverSinglestepScheduler given the
    same timesteps (trailing, ending at abar_0: final_sigmas_type="sigma_min") and the same order list
    (diffusers' own, or the released RealCustom++ code's shifted pairing); ``final_x0`` returns the last
    step's x0 prediction."""
    tab = S.dpm_single_schedule(S.ScheduleConfig.from_dict(SD), n, shifted=shifted, final_x0=shifted)
    ts = np.asarray(tab.timesteps)
    assert ts[0] == 999 and np.all(np.diff(ts) < 0)
    if n == 25:
        assert list(ts[:3]) == [999, 959, 919] and ts[-1] == 39          # the released code's 25 steps
    sched = DPMSolverSinglestepScheduler.from_config({**SD, "final_sigmas_type": "sigma_min", "solver_order": 2,
                                                      "algorithm_type": "dpmsolver++", "solver_type": "midpoint"})
    sched.set_timesteps(timesteps=[int(t) for t in ts])
    if not shifted:
        assert list(sched.order_list) == list(np.asarray(tab.orders))   # ours is diffusers' pairing
    sched.order_list = [int(o) for o in np.asarray(tab.orders)]
    x_t, x = torch.from_numpy(X_T), jnp.asarray(X_T)
    state = S.dpm_single_init(x)
    for i, t in enumerate(sched.timesteps):
        out = fake_model_torch(x_t, t)
        last_x0 = (x_t - (1 - sched.alphas_cumprod[t]) ** 0.5 * out) / sched.alphas_cumprod[t] ** 0.5
        x_t = sched.step(out, t, x_t).prev_sample
        x, state = S.dpm_single_step(tab, "epsilon", fake_model_jax(x, tab.timesteps[i]), x, state, i)
    want = last_x0 if shifted else x_t
    report(f"DPM-Solver++ 2S {n} steps shifted={shifted}", max_abs(x, want.numpy()), 1e-4)
    assert list(S.dpm_single_orders(5, shifted=True)) == [1, 1, 2, 1, 2]


def test_bfloat16_sample_keeps_its_dtype():
    cfg = S.ScheduleConfig.from_dict(SD)
    x = jnp.asarray(X_T, jnp.bfloat16)
    dpm = S.dpm_solver_schedule(cfg, 4)
    state = S.dpm_solver_init(x)
    out, state2 = S.dpm_solver_step(dpm, "epsilon", fake_model_jax(x, 999).astype(jnp.bfloat16), x, state, 0)
    assert out.dtype == jnp.bfloat16 and state2.prev_x0.dtype == state.prev_x0.dtype == jnp.float32
    ddim = S.ddim_schedule(cfg, 4)
    assert S.ddim_step(ddim, "epsilon", x, x, 0)[0].dtype == jnp.bfloat16


# ---------------------------------------------------------------------------------------------
# Config


def test_from_dict_reads_sd_config_and_logs_unknown_keys(caplog):
    with caplog.at_level(logging.WARNING, logger="customjax.schedulers"):
        cfg = S.ScheduleConfig.from_dict({**SD, "skip_prk_steps": True, "_diffusers_version": "0.6.0"})
    assert cfg == S.ScheduleConfig(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", set_alpha_to_one=False, steps_offset=1
    )
    assert "skip_prk_steps" in caplog.text and "_diffusers_version" not in caplog.text
    caplog.clear()
    sdxl = {**SD, "_class_name": "EulerDiscreteScheduler", "interpolation_type": "linear", "sample_max_value": 1.0}
    sdxl.update(prediction_type="epsilon", timestep_spacing="leading", use_karras_sigmas=False)
    with caplog.at_level(logging.WARNING, logger="customjax.schedulers"):
        assert S.ScheduleConfig.from_dict(sdxl).timestep_spacing == "leading"
    assert "interpolation_type" in caplog.text and "sample_max_value" not in caplog.text


@pytest.mark.parametrize(
    "key, value",
    [
        ("clip_sample", True),
        ("trained_betas", [0.1] * 1000),
        ("thresholding", True),
        ("rescale_betas_zero_snr", True),
        ("use_karras_sigmas", True),
        ("algorithm_type", "sde-dpmsolver++"),
        ("solver_order", 3),
        ("beta_schedule", "sigmoid"),
        ("prediction_type", "sample"),
        ("timestep_spacing", "middle"),
        ("final_sigmas_type", "max"),
    ],
)
def test_from_dict_rejects_unsupported_settings(key, value):
    with pytest.raises(ValueError, match=f"{key}=") as err:
        S.ScheduleConfig.from_dict({**SD, key: value})
    assert repr(value)[:8] in str(err.value)


def test_from_folder(tmp_path):
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**SD, "prediction_type": "v_prediction"}))
    assert S.ScheduleConfig.from_folder(tmp_path).prediction_type == "v_prediction"
    (tmp_path / "scheduler_config.json").write_text(json.dumps({**SD, "clip_sample": True}))
    with pytest.raises(ValueError, match="scheduler_config.json: unsupported scheduler setting clip_sample=True"):
        S.ScheduleConfig.from_folder(tmp_path)
    with pytest.raises(FileNotFoundError, match="missing"):
        S.ScheduleConfig.from_folder(tmp_path / "missing")


def test_inference_steps_out_of_range():
    cfg = S.ScheduleConfig()
    for fn in (S.ddim_timesteps, S.dpm_solver_timesteps):
        with pytest.raises(ValueError, match="num_inference_steps=0"):
            fn(cfg, 0)
        with pytest.raises(ValueError, match="num_inference_steps=1001"):
            fn(cfg, 1001)

"""Adapter training: the step lowers the loss; ``customjax.train.train`` on 1 device and in 2
processes x 2 simulated devices (data x fsdp, jax.distributed on localhost; preempted by SIGTERM to
one process, then resumed) reaches the same parameters."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import train_probe
from conftest import cpu_env

HERE = Path(__file__).resolve().parent


def _run_processes(args: dict, n: int = 2, devices: int = 2) -> list[dict]:
    """``train_probe.py`` in ``n`` processes on localhost (jax.distributed, gloo CPU collectives),
    each with ``devices`` simulated devices; their JSON results."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = cpu_env(devices, PYTHONPATH=os.pathsep.join([str(HERE), str(HERE.parent)]))   # this checkout's customjax
    # Without the persistent compilation cache: executables that the first (preempted) run's processes
    # wrote, loaded by the resumed run's, deadlock CustomContrast's first resumed step (a gloo collective
    # mismatch or a hang, 3 of 3 runs; 0 of 2 without the cache).
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    procs = [subprocess.Popen([sys.executable, str(HERE / "train_probe.py"), json.dumps(dict(
        args, distributed=True, coordinator=f"127.0.0.1:{port}", num_processes=n, process_id=i))],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(n)]
    outs = [p.communicate(timeout=900) for p in procs]
    if any(p.returncode for p in procs):     # every process's end: a hang in one shows in the other
        raise AssertionError("\n".join(f"--- process {i} (exit {p.returncode}):\n{se[-2500:]}"
                                        for i, (p, (_, se)) in enumerate(zip(procs, outs))))
    return [json.loads(so.strip().splitlines()[-1]) for so, _ in outs]


# The two-process test trains CustomContrast: beside the shared trainer it has the losses taken over the
# global batch (CSCL's negatives, MACL's appearance weights), which must not depend on how it is split.
METHOD, STEPS = "customcontrast", 5


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """``customjax.train.train`` of the probe config on 1 device, STEPS steps: (export, result)."""
    workdir = tmp_path_factory.mktemp("single")
    out = train_probe.run(workdir, steps=STEPS, method=METHOD)
    return train_probe.exported(workdir), out


def test_train_step_lowers_loss_on_a_fixed_batch():
    from customjax import trainer
    from customjax.methods.build import build
    from customjax.methods.objective import ObjectiveConfig, loss_fn
    from customjax.tokenizer import tokenize
    import jax.numpy as jnp

    c = train_probe.tiny_config()
    c.optim.lr, c.optim.warmup_steps = 3e-3, 0
    built = build(c)
    frozen, train = trainer.split(built)
    tx = trainer.make_optimizer(c.optim)
    state = trainer.init_state(train, tx, jax.random.key(0), ema=False)
    b = next(train_probe.batches(1, 4))
    batch = {"image": jnp.asarray(b["image"]), "reference": jnp.asarray(b["reference"]),
             "ids": tuple(jnp.asarray(tokenize(t, b["caption"])) for t in built.pipe.tokenizers)}
    obj = ObjectiveConfig(0.0, 0.0, 0.0)
    evaluate = jax.jit(lambda p: loss_fn(p, frozen, batch, jax.random.key(7), built=built, cfg=obj)[0])
    step = jax.jit(trainer.make_train_step(built, tx, obj))
    before = float(evaluate(state.params))
    for _ in range(25):
        state, m = step(state, frozen, batch)
    after = float(evaluate(state.params))
    assert np.isfinite(after) and after < before - 1e-3, (before, after)
    assert int(state.step) == 25 and float(m["grad_norm"]) > 0


def test_two_processes_of_two_devices_data_by_fsdp_preempted_and_resumed_equal_one_device(single, tmp_path):
    """``customjax.train.train`` in two processes on localhost, each with 2 simulated devices: a 2
    (data) x 2 (fsdp) mesh over 4 devices (every parameter of >= 256 elements split over fsdp),
    each process loading half of every global batch. Process 1 gets SIGTERM after step 1: both
    stop at the one step JAX's preemption service agrees on (a step or two later: it may not be the
    last, so the run has 5) and save it. Resumed, both run to the end and process 0 exports the
    gathered (fsdp-split) EMA parameters: equal to the 1-device run."""
    ref, ref_out = single
    workdir = tmp_path / "run"
    args = {"steps": STEPS, "fsdp": 2, "workdir": str(workdir), "method": METHOD}
    first = _run_processes(dict(args, term_at=[1, 1]))
    assert all(o["devices"] == 4 and o["processes"] == 2 for o in first)
    stopped = first[0]["step"]
    assert [o["step"] for o in first] == [stopped] * 2 and 1 <= stopped < STEPS, first
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == [str(stopped)]
    assert not (workdir / "export").exists()
    second = _run_processes(args)
    assert [o["step"] for o in second] == [STEPS, STEPS]
    assert second[0]["loss"] == second[1]["loss"]
    np.testing.assert_allclose(second[0]["loss"], ref_out["loss"], rtol=1e-5)
    got = train_probe.exported(workdir)
    assert got.keys() == ref.keys()
    err = max(float(np.max(np.abs(np.asarray(got[k]) - np.asarray(ref[k])))) for k in ref)
    print(f"\n[sharding] {METHOD}: 1 device vs 2 processes x 2 devices (2 data x 2 fsdp), SIGTERM to process 1 "
          f"after step 1 (both stopped at {stopped}), resumed to {STEPS} steps: max abs parameter difference {err:.2e}")
    assert err < 1e-5


def test_subject_weighted_loss():
    """objective.subject_weight: each latent pixel's error weighted by 1 + w * (mask mean-pooled to the
    latent grid), normalised per example; an all-ones mask (no mask in the record) is the plain loss, and
    the loader delivers the mask only when the weight is on."""
    import jax.numpy as jnp

    from customjax.losses import coverage, weighted_mean
    from customjax.methods.objective import ObjectiveConfig, loss_fn

    rng = np.random.default_rng(0)
    err = jnp.asarray(rng.random((2, 4, 4, 3)), jnp.float32)
    subject_weighted_mse = lambda e, m, w: weighted_mean(e, coverage(m, e.shape[1:3]), w, per_example=True)
    np.testing.assert_allclose(subject_weighted_mse(err, jnp.ones((2, 8, 8)), 5.0), err.mean(), rtol=1e-6)
    mask = np.zeros((2, 8, 8), np.float32)
    mask[0, :4, :4] = 1.0          # example 0: the top-left 2 x 2 latents are the subject
    mask[1, :2, :2] = 1.0          # example 1: the top-left latent alone
    e = np.asarray(err)
    v0 = np.ones((4, 4))
    v0[:2, :2] = 6.0
    v1 = np.ones((4, 4))
    v1[0, 0] = 6.0
    want = np.mean([(v[..., None] * e[i]).sum() / (v.sum() * 3) for i, v in enumerate((v0, v1))])
    np.testing.assert_allclose(subject_weighted_mse(err, jnp.asarray(mask), 5.0), want, rtol=1e-6)
    # the pretraining's object_weight normalises over the whole batch instead: another figure here
    batchwise = weighted_mean(err, coverage(jnp.asarray(mask), (4, 4)), 5.0)
    want_b = sum((v[..., None] * e[i]).sum() for i, v in enumerate((v0, v1))) / ((v0.sum() + v1.sum()) * 3)
    np.testing.assert_allclose(batchwise, want_b, rtol=1e-6)
    assert abs(float(batchwise) - want) > 1e-4
    with pytest.raises(ValueError, match="does not pool onto the grid"):
        subject_weighted_mse(err, jnp.ones((2, 9, 9)), 1.0)

    built, frozen, train, batch = train_probe.objective_inputs()
    b = next(train_probe.batches(1, 4))
    plain, weighted = ObjectiveConfig(0.0, 0.0, 0.0), ObjectiveConfig(0.0, 0.0, 0.0, subject_weight=5.0)
    key = jax.random.key(3)
    base = float(loss_fn(train, frozen, batch, key, built=built, cfg=plain)[0])
    ones = {**batch, "mask": jnp.ones(batch["image"].shape[:3])}
    np.testing.assert_allclose(float(loss_fn(train, frozen, ones, key, built=built, cfg=weighted)[0]), base, rtol=1e-5)
    half = np.zeros(batch["image"].shape[:3], np.float32)
    half[:, : half.shape[1] // 2] = 1.0
    assert abs(float(loss_fn(train, frozen, {**batch, "mask": jnp.asarray(half)}, key, built=built, cfg=weighted)[0])
               - base) > 1e-6
    with pytest.raises(ValueError, match="subject mask in the batch"):
        loss_fn(train, frozen, batch, key, built=built, cfg=weighted)
    from customjax.train import host_batch     # the loader's mask reaches the train step
    assert "mask" not in host_batch(b, built.pipe.tokenizers)
    assert host_batch({**b, "mask": half}, built.pipe.tokenizers)["mask"].shape == half.shape


def test_a_method_need_the_batch_lacks_is_named():
    from customjax.train import host_batch

    b = next(train_probe.batches(1, 2))
    with pytest.raises(ValueError, match=r"reads \['views'\] from every training batch.*'caption', 'image', 'reference'"):
        host_batch(b, (), needs=("reference", "views"))

"""Adapter training: the step lowers the loss; 1 device and 2 processes x 2 simulated devices
(data x fsdp, jax.distributed on localhost) reach the same parameters."""

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

HERE = Path(__file__).resolve().parent


def _probe(args: dict, devices: int = 1, extra_env=None):
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(HERE), **(extra_env or {}))
    return subprocess.Popen([sys.executable, str(HERE / "train_probe.py"), json.dumps(args)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    return train_probe.run(steps=3)


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


def test_two_processes_of_two_devices_data_by_fsdp_equal_one_device(single, tmp_path):
    """Two processes on localhost (jax.distributed, CPU collectives), each with 2 simulated devices:
    a 2 (data) x 2 (fsdp) mesh over 4 devices, each process feeding half of every global batch.
    After 3 steps both processes hold identical parameters, equal to the 1-device run."""
    ref, _ = single
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [_probe({"steps": 3, "fsdp": 2, "distributed": True, "coordinator": f"127.0.0.1:{port}",
                     "num_processes": 2, "process_id": i, "out": str(tmp_path / f"proc{i}.npz")}, devices=2)
             for i in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    for p, (so, se) in zip(procs, outs):
        assert p.returncode == 0, se[-3000:]
        info = json.loads(so.strip().splitlines()[-1])
        assert info["devices"] == 4 and info["processes"] == 2
    a, b = (np.load(tmp_path / f"proc{i}.npz") for i in range(2))
    assert set(a.files) == set(ref)
    assert all(np.array_equal(a[k], b[k]) for k in a.files)
    err = max(float(np.max(np.abs(a[k] - ref[k]))) for k in ref)
    print(f"\n[sharding] 1 device vs 2 processes x 2 devices (2 data x 2 fsdp), 3 steps: "
          f"max abs parameter difference {err:.2e}")
    assert err < 1e-5

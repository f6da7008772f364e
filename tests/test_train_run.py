"""The training run: `tiny` on synthetic data writes checkpoints, metrics, TensorBoard events and
an export; a run stopped by SIGTERM and resumed equals an uninterrupted one."""

import json
import os
import signal

import numpy as np

import train_probe
from customjax.weights.safetensors_io import load_file


def _config(steps):
    c = train_probe.tiny_config()
    c.train.steps, c.train.log_every, c.train.save_every, c.train.async_save = steps, 1, 100, False
    c.data.synthetic_examples = 16
    return c


def _losses(workdir):
    return [json.loads(l)["loss"] for l in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_sigterm_then_resume_equals_uninterrupted(tmp_path):
    from customjax import train as train_mod

    full = tmp_path / "full"
    train_mod.train(_config(6), str(full))
    assert sorted(p.name for p in (full / "checkpoints").iterdir()) == ["6"]
    assert any((full / "tb").iterdir()) and (full / "config.json").is_file()
    want = load_file(full / "export" / "adapter.safetensors")

    def term_at(k):
        def hook(step):
            if step == k:
                os.kill(os.getpid(), signal.SIGTERM)
        return hook

    run = tmp_path / "run"
    try:
        out = train_mod.train(_config(6), str(run), on_step=term_at(3))
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        train_mod._Preempted.flag = False
    assert out["step"] == 3 and not (run / "export").exists()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["3"]
    out = train_mod.train(_config(6), str(run))
    assert out["step"] == 6
    got = load_file(run / "export" / "adapter.safetensors")
    assert want.keys() == got.keys()
    err = max(float(np.max(np.abs(np.asarray(want[k]) - np.asarray(got[k])))) for k in want)
    print(f"\n[resume] SIGTERM at step 3 + resume vs uninterrupted, 6 steps: max abs parameter difference {err:.1e}")
    assert err < 1e-6
    np.testing.assert_allclose(_losses(run), _losses(full), rtol=1e-6)

"""Training never loses a good state (issue 27): a diverging run stops with its last good
checkpoint and no export; a resume with a different config is refused before anything is
written; an unreadable newest checkpoint is passed over by resume and export; a preempted run says
so in its exit code; log/save every 0 means never; metrics.jsonl neither repeats steps nor writes
bare NaN; the CLIs fail in one line before building anything."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

import train_probe
from conftest import cpu_env
from customjax import train as T
from customjax.cli import EXIT_DIVERGED, EXIT_PREEMPTED, EXIT_USAGE
from customjax.resume import ResumeError
from customjax.weights.safetensors_io import load_file, read_metadata, save_file

ROOT = train_probe.ROOT


def _cfg(steps, **train):
    c = train_probe.run_config(steps)
    c.train.update(train)
    return c


def _metrics(workdir):
    text = (workdir / "metrics.jsonl").read_text()
    return text, [json.loads(line) for line in text.splitlines()]


def _checkpoint_params(workdir, step):
    """The trainable parameters of checkpoint ``step`` (host numpy), read with the export code."""
    out = workdir / f"e{step}.safetensors"
    from customjax.export import export
    export(str(workdir), str(out), step=step)
    return load_file(out)


def test_divergence_keeps_the_last_good_checkpoint_and_exports_nothing(tmp_path):
    """A learning rate of 1e30 makes every update overflow: each step is skipped on device, the run
    stops past max_bad_steps naming the last good checkpoint, which equals the initial parameters;
    metrics.jsonl records the steps with null, not NaN; nothing is exported."""
    c = _cfg(12, max_bad_steps=2, save_every=2)
    c.optim.update(dict(lr=1e30, warmup_steps=0))
    with pytest.raises(T.Diverged, match=r"3 consecutive steps up to step 3.*last good checkpoint is step 2"):
        T.train(c, str(tmp_path))
    assert not (tmp_path / "export").exists()
    text, rows = _metrics(tmp_path)
    assert "NaN" not in text and [r["step"] for r in rows] == [1, 2, 3]
    assert [r["skipped_steps"] for r in rows] == [1, 2, 3] and all(r["nonfinite"] == 1.0 for r in rows)
    good = _checkpoint_params(tmp_path, 2)
    assert all(np.all(np.isfinite(v)) for v in good.values())
    # nothing moved: the checkpoint holds the initial parameters (every update was skipped)
    from customjax.methods.build import build, trainable_tree
    init = build(_cfg(1))
    want = init.method.state_dict(jax.device_get(trainable_tree(init)))
    assert all(np.array_equal(good[k], want[k]) for k in want)


def test_divergence_exit_code_and_a_nan_adapter_is_refused(tmp_path):
    r = subprocess.run([sys.executable, "-m", "customjax.train", "--config", "configs/realcustompp.py:tiny",
                        "--workdir", str(tmp_path / "run"), "--config.optim.lr=1e30", "--config.optim.warmup_steps=0",
                        "--config.train.steps=8", "--config.train.max_bad_steps=1", "--config.train.log_every=1",
                        "--config.train.preview_every=0", "--config.data.examples=16"],
                       cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert r.returncode == EXIT_DIVERGED, r.stderr[-2000:]
    assert "training diverged" in r.stderr and not (tmp_path / "run" / "export").exists()
    # an adapter file with a NaN is refused at load, naming the tensor
    from customjax.methods.build import build, load_adapter, save_adapter
    built = build(train_probe.tiny_config())
    f = save_adapter(built, tmp_path / "nan")
    state = load_file(f)
    key = sorted(state)[0]
    state = {k: np.array(v) for k, v in state.items()}
    state[key].reshape(-1)[0] = np.nan
    save_file(state, f, metadata=read_metadata(f))
    with pytest.raises(ValueError, match="non-finite values in 1 tensor"):
        load_adapter(built, tmp_path / "nan")


def test_resume_with_another_config_is_refused_and_config_json_kept(tmp_path):
    T.train(_cfg(2), str(tmp_path))
    before = (tmp_path / "config.json").read_bytes()
    for key, value in (("train.batch", 8), ("train.ema_decay", 0.5), ("optim.accumulate", 2), ("ccp.dim_head", 8),
                       ("method", "realcustom")):
        c = _cfg(4)
        section, _, leaf = key.rpartition(".")
        (c[section] if section else c)[leaf] = value
        with pytest.raises(ResumeError, match=rf"{key.replace('.', '[.]')}: checkpoint .* -> this run {value!r}"):
            T.train(c, str(tmp_path))
        assert (tmp_path / "config.json").read_bytes() == before
    # what is safe to change goes on: more steps, other logging
    out = T.train(_cfg(3, log_every=2), str(tmp_path))
    assert out["step"] == 3 and out["status"] == "finished"
    # and a named change on purpose
    c = _cfg(4)
    c.objective.p_drop_text = 0.5
    with pytest.raises(ResumeError, match="objective.p_drop_text"):
        T.train(c, str(tmp_path))
    assert T.train(c, str(tmp_path), allow_changes=["objective."])["step"] == 4


def test_unreadable_newest_checkpoint_is_passed_over(tmp_path):
    """Truncating the newest checkpoint's data: resume falls back to the previous step (named, the
    broken one moved aside), training goes on, metrics.jsonl keeps one line per step; export falls back
    too and records the step it used."""
    T.train(_cfg(4, save_every=2), str(tmp_path), stop_after=4)
    files = sorted((p for p in (tmp_path / "checkpoints" / "4").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(files[-1], "r+b") as fh:       # the largest data file, cut short
        fh.truncate(files[-1].stat().st_size // 3)
    out = tmp_path / "fallback.safetensors"
    from customjax.export import export
    export(str(tmp_path), str(out))
    assert read_metadata(out)["step"] == "2"
    res = T.train(_cfg(6, save_every=2), str(tmp_path))
    assert res["step"] == 6 and (tmp_path / "checkpoints" / "4.unreadable").is_dir()
    assert sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())[-1] == 6
    _, rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert read_metadata(tmp_path / "export" / "adapter.safetensors")["step"] == "6"


def test_every_zero_means_never_and_preemption_status(tmp_path):
    import os
    import signal
    import time

    out = T.train(_cfg(2, log_every=0, save_every=0), str(tmp_path / "a"))
    assert out["status"] == "finished" and (tmp_path / "a" / "checkpoints" / "2").is_dir()
    assert len(_metrics(tmp_path / "a")[1]) == 1        # the last step is always logged

    def term(step):
        if step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
    out = T.train(_cfg(4), str(tmp_path / "b"), on_step=term)
    assert out["status"] == "preempted" and out["step"] == 1 and (tmp_path / "b" / "checkpoints" / "1").is_dir()


def test_main_exit_codes(monkeypatch, capsys):
    """The CLI's codes a scheduler reads: 75 after a preemption, 65 when diverged, 2 for a refused
    resume; 0 otherwise."""
    from absl import flags

    T.define_flags() if "workdir" not in flags.FLAGS else None
    flags.FLAGS(["train", "--config", str(ROOT / "configs/realcustompp.py") + ":tiny", "--workdir", "/tmp/unused"])
    for result, code in (({"step": 1, "status": "preempted"}, EXIT_PREEMPTED), (T.Diverged("x"), EXIT_DIVERGED),
                         (ResumeError("y"), EXIT_USAGE), ({"step": 2, "status": "finished", "loss": float("nan")}, None)):
        def fake(*a, result=result, **k):
            if isinstance(result, Exception):
                raise result
            return result
        monkeypatch.setattr(T, "train", fake)
        if code is None:
            T.main([])
            assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["loss"] is None
        else:
            with pytest.raises(SystemExit) as e:
                T.main([])
            assert e.value.code == code


@pytest.mark.parametrize("args,needle", [
    (["-m", "customjax.train", "--config", "configs/realcustompp.py:tiny", "--workdir", "W", "--config.train.stepz=3"],
     "customjax.train: --config.train.stepz: unknown key 'stepz'"),
    (["-m", "customjax.train", "--config", "configs/nope.py:tiny", "--workdir", "W"],
     "customjax.train: config file configs/nope.py does not exist"),
    (["-m", "customjax.sample", "--config", "configs/realcustompp.py:tiny", "--checkpoint", "/no/such/export",
      "--prompt", "a toy", "--word", "toy", "--reference", "examples/toy.png"],
     "customjax.sample: --checkpoint /no/such/export: no such file or folder"),
    (["-m", "customjax.export", "--workdir", "/no/such/run", "--out", "x.safetensors"],
     "customjax.export: --workdir /no/such/run: no such folder"),
    (["-m", "customjax.sample", "--config", "configs/realcustompp.py:sd15", "--config.encoders.dino=/no/dino",
      "--prompt", "a toy", "--word", "toy", "--reference", "examples/toy.png"],
     "customjax.sample: config.encoders.dino='/no/dino': no such file or folder"),
    (["-m", "customjax.train", "--config", "configs/realcustompp.py:tiny", "--workdir", "W",
      "--config.data.text_image=/no/shards"], "customjax.train: config.data.text_image='/no/shards': no such file"),
    (["-m", "customjax.train", "--config", "configs/realcustompp.py:tiny", "--workdir", "W",
      "--config.data.generator=shapewrld"], "customjax.train: config.data.generator='shapewrld' is not registered"),
])
def test_cli_errors_are_one_line_before_any_model(args, needle, tmp_path):
    r = subprocess.run([sys.executable, *[a.replace("W", str(tmp_path / "w")) for a in args]], cwd=ROOT,
                       env=cpu_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_USAGE and needle in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and "random tiny" not in r.stderr
    assert not (tmp_path / "w").exists()


def test_sample_names_an_adapter_of_another_method_before_building(tmp_path):
    from customjax.methods.build import build, save_adapter
    save_adapter(build(train_probe.tiny_config("realcustom")), tmp_path / "rc")
    r = subprocess.run([sys.executable, "-m", "customjax.sample", "--config", "configs/realcustompp.py:tiny",
                        "--checkpoint", str(tmp_path / "rc"), "--prompt", "a toy", "--word", "toy", "--reference",
                        "examples/toy.png"], cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=120)
    assert r.returncode == EXIT_USAGE and "an adapter of method 'realcustom'" in r.stderr, r.stderr[-2000:]
    assert "random tiny" not in r.stderr and "Traceback" not in r.stderr

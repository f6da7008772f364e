"""launch/: the three launch scripts (multi_gpu.sh, slurm.sbatch, tpu_vm.sh). With ``DRY_RUN=1`` each prints
the trainer command it would run (checked: config, workdir, model, data, the recipe with and without
MULTIVIEW) and runs nothing; with fake ``python3`` / ``srun`` / ``scontrol`` / ``gcloud`` on the PATH, each runs
exactly that command and hands the trainer's exit status on (SLURM: 75 requeues the job); and the printed
command, run for real on a tiny pipeline and tiny shards written by ``customjax.data.convert``, trains a step
and saves its checkpoint (one real run per script)."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cpu_env

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ("multi_gpu.sh", "slurm.sbatch", "tpu_vm.sh")
DISTRIBUTED = {"multi_gpu.sh": False, "slurm.sbatch": True, "tpu_vm.sh": True}
# Variables each script needs besides WORKDIR, MODEL, DATA.
SCRIPT_ENV = {"multi_gpu.sh": {}, "slurm.sbatch": {}, "tpu_vm.sh": {"TPU_NAME": "fake-tpu", "ZONE": "fake-zone"}}
CONFIG = "configs/realcustompp.py:tiny"
# A 1-step tiny run that saves its step: no previews, no synthetic data (the shards are given).
TINY_ARGS = ("--config.train.steps=1", "--config.train.preview_every=0", "--config.train.save_every=1",
             "--config.train.batch=2", "--config.data.generator=", "--config.train.async_save=False")
NOTICE = "MULTIVIEW not set"

# Stand-ins for the programs the scripts call; each appends its argv to $FAKE_LOG/calls.jsonl.
FAKES = {
    # the trainer: exits $FAKE_RC (pip, on the TPU workers, succeeds)
    "python3": """
args = sys.argv[1:]
if args[:2] == ["-m", "pip"]:
    sys.exit(0)
record("python3", args)
sys.exit(int(os.environ.get("FAKE_RC", "0")))
""",
    # runs its command (one task) and exits with its status
    "srun": """
record("srun", sys.argv[1:])
sys.exit(subprocess.call(sys.argv[1:]))
""",
    "scontrol": """
record("scontrol", sys.argv[1:])
sys.exit(int(os.environ.get("FAKE_SCONTROL_RC", "0")))
""",
    # runs the --command on one "worker": bash in a home that holds the checkout
    "gcloud": """
args = sys.argv[1:]
record("gcloud", args)
command = args[args.index("--command") + 1]
sys.exit(subprocess.call(["bash", "-c", command], env=dict(os.environ, HOME=os.environ["FAKE_HOME"])))
""",
}
FAKE_HEAD = """#!{exe}
import json, os, subprocess, sys

def record(name, args):
    with open(os.path.join(os.environ["FAKE_LOG"], "calls.jsonl"), "a") as f:
        f.write(json.dumps([name, *args]) + "\\n")
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    """A tiny diffusers pipeline (``python -m customjax.zoo``) and tiny text-image and multiview shards
    written by ``customjax.data.convert``'s command line from image folders (launch/README.md)."""
    from customjax.data import convert, synthetic

    root = tmp_path_factory.mktemp("launch_assets")
    subprocess.run([sys.executable, "-m", "customjax.zoo", "--kind", "sd15", "--out", str(root / "model")],
                   cwd=ROOT, env=cpu_env(1), check=True, capture_output=True, timeout=300)
    synthetic.write_image_folder(root / "images", 8, size=64)                     # key.jpg + key.txt
    synthetic.write_multiview_folder(root / "objects", 4, num_frames=2, size=64)  # object/view.jpg
    assert convert.command(["folder", str(root / "images"), "--out", str(root / "text_image"), "--num_shards", "2",
                         "--no_progress"]) == 0
    assert convert.command(["multiview", str(root / "objects"), "--out", str(root / "multiview"), "--min_frames", "2",
                         "--no_progress"]) == 0
    return {"model": str(root / "model"), "text_image": str(root / "text_image"),
            "multiview": str(root / "multiview")}


@pytest.fixture(scope="module")
def fakes(tmp_path_factory):
    """A folder of the fake programs, and the fake TPU worker's home (with ``~/customjax``)."""
    root = tmp_path_factory.mktemp("launch_fakes")
    (root / "bin").mkdir()
    for name, body in FAKES.items():
        path = root / "bin" / name
        path.write_text(FAKE_HEAD.format(exe=sys.executable) + body)
        path.chmod(0o755)
    (root / "home" / "customjax").mkdir(parents=True)
    return root


def launch(script, *, workdir, model, data, multiview=None, args=(), dry_run=True, fakes=None, log=None, **env):
    """``bash launch/<script> args`` from the repository root (SLURM_JOB_ID and the other SLURM variables
    unset unless given); with ``fakes`` their bin folder leads the PATH."""
    e = cpu_env(1, WORKDIR=str(workdir), MODEL=str(model), DATA=str(data), CONFIG=CONFIG,
                **SCRIPT_ENV[script], **env)
    for k in [k for k in e if k.startswith("SLURM_") and k not in env] + ["MULTIVIEW", "DRY_RUN"]:
        e.pop(k, None)
    if multiview is not None:
        e["MULTIVIEW"] = str(multiview)
    if dry_run:
        e["DRY_RUN"] = "1"
    if fakes is not None:
        log.mkdir(parents=True, exist_ok=True)
        e.update(PATH=f"{fakes / 'bin'}{os.pathsep}{e['PATH']}", FAKE_LOG=str(log), FAKE_HOME=str(fakes / "home"))
    return subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, env=e, capture_output=True, text=True,
                          timeout=60)


def calls(log) -> list[list[str]]:
    path = Path(log) / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def dry_command(script, **kw) -> tuple[list[str], str]:
    """(the printed trainer command as argv, stderr) of a dry run."""
    out = launch(script, dry_run=True, **kw)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert len(lines) == 1, out.stdout       # one line: the command
    return shlex.split(lines[0]), out.stderr


def flag(argv, name) -> str:
    """The value of ``--name value`` or ``--name=value`` (given once)."""
    got = [argv[i + 1] for i, a in enumerate(argv) if a == name] + \
          [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(got) == 1, (name, argv)
    return got[0]


# ----------------------------------------------------------------------------------------------------------
# Dry runs: the command, and nothing run.


@pytest.mark.parametrize("with_multiview", [False, True], ids=["text_image", "multiview"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_dry_run_prints_the_trainer_command_and_runs_nothing(script, with_multiview, fakes, tmp_path):
    # awkward paths: the printed line is shell-quoted, word for word
    data, mv = "/data/laion shards/it's", "/data/mv $HOME"
    extra = ("--config.train.fsdp=4", "--config.train.remat=True")
    argv, err = dry_command(script, workdir=tmp_path / "w", model="/weights/tiny model", data=data,
                            multiview=mv if with_multiview else None, args=extra, fakes=fakes, log=tmp_path / "log")
    assert argv[:3] == ["python3", "-m", "customjax.train"]
    assert ("--distributed" in argv) == DISTRIBUTED[script] and argv.count("--distributed") <= 1
    assert flag(argv, "--config") == CONFIG
    assert flag(argv, "--workdir") == str(tmp_path / "w")
    assert flag(argv, "--config.model.path") == "/weights/tiny model"
    assert flag(argv, "--config.data.text_image") == data
    assert tuple(argv[-len(extra):]) == extra                # extra arguments last: they win
    recipes = [a for a in argv if a.startswith("--config.data.recipe")]
    if with_multiview:
        assert flag(argv, "--config.data.multiview") == mv and recipes == [] and NOTICE not in err
    else:
        assert recipes == ["--config.data.recipe=text_image"] and not any("multiview" in a for a in argv)
        assert len([line for line in err.splitlines() if NOTICE in line]) == 1
    assert calls(tmp_path / "log") == []                     # no python3, srun, scontrol or gcloud


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_variable_is_a_usage_error(script, tmp_path):
    out = launch(script, workdir=tmp_path, model="/m", data="")
    assert out.returncode == 2 and "set DATA" in out.stderr and out.stdout == ""


def test_tpu_vm_refuses_bucket_shards(tmp_path):
    out = launch("tpu_vm.sh", workdir="gs://bucket/run", model="/m", data="gs://bucket/shards")
    assert out.returncode == 2 and "gs://bucket/shards" in out.stderr and out.stdout == ""
    argv, _ = dry_command("tpu_vm.sh", workdir="gs://bucket/run", model="/m", data="/mnt/bucket/shards")
    assert flag(argv, "--workdir") == "gs://bucket/run"      # the workdir may be a bucket


# ----------------------------------------------------------------------------------------------------------
# What runs (fake programs): the printed command, and the trainer's exit status handed on.


@pytest.mark.parametrize("rc", [0, 75, 65, 2])
@pytest.mark.parametrize("script", SCRIPTS)
def test_runs_the_printed_command_and_hands_on_the_exit_status(script, rc, fakes, tmp_path):
    kw = dict(workdir=tmp_path / "w", model="/weights/m", data="/data/ti shards", multiview="/data/mv",
              args=("--config.train.fsdp=2",))
    argv, _ = dry_command(script, **kw)
    env = dict(SLURM_JOB_ID="4242") if script == "slurm.sbatch" else {}
    out = launch(script, dry_run=False, fakes=fakes, log=tmp_path / "log", FAKE_RC=str(rc), **kw, **env)
    got = calls(tmp_path / "log")
    trainer = [c for c in got if c[0] == "python3"]
    assert trainer == [argv], got                            # exactly the dry run's command, once
    if script == "slurm.sbatch":
        assert got[0] == ["srun", *argv]
        requeue = [c for c in got if c[0] == "scontrol"]
        assert requeue == ([["scontrol", "requeue", "4242"]] if rc == 75 else [])
        assert out.returncode == (0 if rc == 75 else rc), out.stderr   # requeued: the job ends cleanly
    elif script == "tpu_vm.sh":
        gcloud = got[0]
        assert gcloud[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"] and "fake-tpu" in gcloud
        assert flag(gcloud, "--zone") == "fake-zone" and "--worker=all" in gcloud
        assert out.returncode == rc and f"trainer exit {rc}" in out.stderr
    else:
        assert out.returncode == rc


def test_slurm_failed_requeue_keeps_75(fakes, tmp_path):
    out = launch("slurm.sbatch", dry_run=False, fakes=fakes, log=tmp_path / "log", workdir=tmp_path / "w",
                 model="/m", data="/d", FAKE_RC="75", FAKE_SCONTROL_RC="1", SLURM_JOB_ID="7")
    assert out.returncode == 75 and "requeue failed" in out.stderr
    assert [c for c in calls(tmp_path / "log") if c[0] == "scontrol"] == [["scontrol", "requeue", "7"]]


def test_slurm_header_keeps_signal_and_requeue():
    text = (ROOT / "launch" / "slurm.sbatch").read_text()
    header = text[:text.index("\nset -euo pipefail")]
    for line in ("#SBATCH --signal=TERM@120", "#SBATCH --requeue", "#SBATCH --open-mode=append"):
        assert line in header.splitlines()
    # sbatch reads #SBATCH lines only before the first command
    first_command = next(i for i, line in enumerate(text.splitlines())
                         if line.strip() and not line.startswith("#"))
    last_sbatch = max(i for i, line in enumerate(text.splitlines()) if line.startswith("#SBATCH"))
    assert last_sbatch < first_command


# ----------------------------------------------------------------------------------------------------------
# The printed command, run for real: a tiny pipeline, tiny shards, one step, one checkpoint.


@pytest.mark.parametrize("script,with_multiview", [("multi_gpu.sh", True), ("slurm.sbatch", False),
                                                   ("tpu_vm.sh", False)])
def test_printed_command_trains_a_step_and_saves(script, with_multiview, assets, tmp_path):
    workdir = tmp_path / "run"
    argv, _ = dry_command(script, workdir=workdir, model=assets["model"], data=assets["text_image"],
                          multiview=assets["multiview"] if with_multiview else None, args=TINY_ARGS)
    # this interpreter for python3; one process without a coordinator: no --distributed
    cmd = [sys.executable] + [a for a in argv[1:] if a != "--distributed"]
    out = subprocess.run(cmd, cwd=ROOT, env=cpu_env(1), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    assert (workdir / "checkpoints" / "1").is_dir(), sorted(p.name for p in (workdir / "checkpoints").iterdir())
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["path"] == assets["model"] and config["data"]["text_image"] == assets["text_image"]
    if with_multiview:
        assert config["data"]["multiview"] == assets["multiview"] and config["data"]["recipe"] == "curriculum"
    else:
        assert config["data"]["multiview"] == "" and config["data"]["recipe"] == "text_image"

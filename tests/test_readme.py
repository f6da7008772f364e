"""The README is a user document that runs as written: under 20 KB, what works and the two commands
on its first screen; every command's module, config, preset, config key and flag exists; the cheap
commands (the `:tiny` job) and the Python example run (in a scratch folder beside links to
configs/ and examples/)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import cpu_env

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", README, re.S)


def _commands() -> list[list[str]]:
    """Every ``python -m customjax...`` command of the bash blocks, as argv (``&&`` chains split)."""
    out = []
    for block in _blocks("bash"):
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            line = line.split(" #")[0].strip()
            if line.startswith("#") or not line:
                continue
            for part in line.split("&&"):
                argv = shlex.split(part.replace("$R", ""))
                if "-m" in argv and argv[argv.index("-m") + 1].startswith("customjax"):
                    out.append(argv[argv.index("-m") - 1:])
    return out


COMMANDS = _commands()


def test_readme_is_short_and_its_first_screen_says_what_works_and_how_to_start():
    assert len(README.encode()) < 20000, len(README.encode())
    first = "\n".join(README.splitlines()[:45])
    for method in ("RealCustom", "RealCustom++", "IP-Adapter", "CustomContrast", "Contrastive Inversion", "CLIF"):
        assert method in first, method
    assert "planned" in first and "implemented" in first
    assert "customjax.train --config configs/realcustompp.py --workdir" in first     # the main job, bare config
    assert "python -m pytest -q" in first                                           # the tests
    for log_marker in ("What held the category", "The token objective", "What the figures say"):
        assert log_marker not in README, f"research log in the README: {log_marker!r}"


def test_every_command_names_a_real_module_config_preset_key_and_flag():
    from importlib.util import find_spec

    from customjax import api

    assert len(COMMANDS) >= 8, COMMANDS
    helps = {}
    for argv in COMMANDS:
        module = argv[2]
        assert find_spec(module) is not None, module
        if module not in helps:
            helps[module] = subprocess.run([sys.executable, "-m", module, "--helpfull"], capture_output=True,
                                           text=True, env=cpu_env(1), cwd=ROOT, timeout=120).stdout
        args = argv[3:]
        config = None
        for i, a in enumerate(args):
            if not a.startswith("--"):
                continue
            name = a[2:].split("=")[0]
            if name == "config":
                config = api.load_config(ROOT / args[i + 1])          # variant and presets must exist
            elif name.startswith("config."):
                keys = name.split(".")[1:]
                node = config
                for k in keys:
                    assert k in node, f"{' '.join(argv)}: unknown config key {name}"
                    node = node[k]
            else:
                flag = name[2:] if name.startswith("no") and f"--{name[2:]}" in helps[module] else name
                assert f"--{flag}" in helps[module], f"{module} has no flag --{name}"


def _scratch(tmp_path: Path) -> Path:
    for d in ("configs", "examples"):
        os.symlink(ROOT / d, tmp_path / d)
    return tmp_path


def test_the_tiny_job_runs_as_written(tmp_path):
    block = next(b for b in _blocks("bash") if ":tiny" in b and "customjax.train" in b)
    line = block.strip().replace("python -m", f"{sys.executable} -m")
    cwd = _scratch(tmp_path)
    out = subprocess.run(line, shell=True, cwd=cwd, env=cpu_env(1), capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    assert (cwd / "runs/tiny/export/adapter.safetensors").is_file() and (cwd / "out/tiny/grid.png").is_file()
    # a quiet console: progress bars and summary lines, no INFO flood
    assert "customjax.train: train step compiled" in out.stderr
    assert not re.search(r"^I\d{4} |INFO:", out.stderr, re.M), out.stderr[:2000]


def test_the_python_example_runs_in_process(tmp_path):
    code = next(b for b in _blocks("python") if "Customizer" in b)
    cwd = _scratch(tmp_path)
    out = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=cpu_env(1), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().startswith("(4, 64, 64, 3) (1, 8, 8)"), out.stdout
    assert (cwd / "out/api/grid.png").is_file() and (cwd / "out/api/record.json").is_file()

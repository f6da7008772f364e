"""The README is a user document that runs as written: under 20 KB, what works and the two commands
on its first screen; every command's module, config, preset, config key and flag exists; the cheap
commands (the `:tiny` job) run (in a scratch folder beside links to configs/ and examples/). The
Python example runs in process in tests/test_api.py."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path


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
    status = [line for line in first.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(status) == 7 and all("| implemented" in line or "| planned" in line for line in status), status
    assert "customjax.train --config configs/realcustompp.py --workdir" in first     # the main job, bare config
    assert "python -m pytest -q" in first                                           # the tests
    for log_marker in ("What held the category", "The token objective", "What the figures say"):
        assert log_marker not in README, f"research log in the README: {log_marker!r}"


def test_every_command_names_a_real_module_config_preset_key_and_flag():
    from importlib.util import find_spec

    from customjax import api

    from concurrent.futures import ThreadPoolExecutor

    assert len(COMMANDS) >= 8, COMMANDS
    modules = sorted({argv[2] for argv in COMMANDS})
    assert all(find_spec(m) is not None for m in modules), modules
    with ThreadPoolExecutor(len(modules)) as pool:
        helps = dict(zip(modules, pool.map(lambda m: subprocess.run(
            [sys.executable, "-m", m, "--helpfull"], capture_output=True, text=True, env=cpu_env(1), cwd=ROOT,
            timeout=300).stdout, modules)))
    for argv in COMMANDS:
        module = argv[2]
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
    assert "customjax.train: train step compiled and run in" in out.stderr
    assert not re.search(r"^I\d{4} |INFO:", out.stderr, re.M), out.stderr[:2000]

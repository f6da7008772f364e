"""Every command line of the package speaks absl through :func:`customjax.cli.parse_flags`:
``python -m <module> --help`` exits 0 and lists the command's own flags (with their help strings, not
absl's or the libraries'), and a bad flag value or an unknown flag exits 2 with one line
``<prog>: ...`` on stderr, no traceback. The subprocesses (each imports jax: seconds) run in threads."""

from __future__ import annotations

import concurrent.futures
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# module: (its own flags that --help must name, an argument list with one bad flag value or unknown flag,
#          what the one-line error must mention)
CLIS = {
    "customjax.train": (["--config", "--workdir", "--distributed", "--stop_after", "--allow_config_change"],
                        ["--workdir", "W", "--stop_after=x"], "--stop_after"),
    "customjax.sample": (["--config", "--checkpoint", "--prompts", "--prompt", "--word", "--reference", "--seeds",
                          "--out"], ["--nope"], "nope"),
    "customjax.finetune": (["--config", "--concept", "--concepts", "--token", "--class_word", "--workdir", "--stop_after"],
                           ["--workdir", "W", "--stop_after=x"], "--stop_after"),
    "customjax.export": (["--workdir", "--step", "--ema", "--public", "--out"],
                         ["--workdir", "W", "--out", "O", "--step", "x"], "--step"),
    "customjax.txt2img": (["--model", "--prompt", "--concept", "--prompts_file", "--seeds", "--steps", "--guidance", "--sampler",
                           "--batch", "--out"], ["--model", "M", "--prompt", "a toy", "--seeds", "1,x"], "--seeds"),
    "customjax.zoo": (["--kind", "--out", "--seed"], ["--out", "O", "--kind", "sd3"], "--kind"),
    "customjax.evaluate": (["--protocol", "--methods", "--out", "--subjects", "--base", "--clip", "--dino", "--fast",
                            "--sample_masks", "--score_only"], ["--out", "O", "--protocol", "coco"], "--protocol"),
    "customjax.data.convert": (["--out", "--name", "--num_shards", "--min_frames", "--allow_empty_caption",
                                "--verify", "--no_progress"],
                               ["folder", "SRC", "--out", "O", "--verify", "everything"], "--verify"),
    "customjax.data.synthetic": (["--num_text_image", "--num_multiview", "--num_frames", "--size", "--num_shards",
                                  "--seed"], ["OUT", "--size", "abc"], "--size"),
    "customjax.data.precompute": (["--config", "--out", "--batch", "--dtype", "--part", "--num_parts", "--num_shards"],
                                  ["--out", "O", "--dtype", "float64"], "--dtype"),
    "customjax.shapeworld.world": (["--num_text_image", "--num_multiview", "--frames", "--size", "--seed", "--shards",
                                    "--num_eval", "--max_objects"], ["OUT", "--num_text_image=-1"],
                                   "--num_text_image"),
    "customjax.shapeworld.pretrain": (["--config", "--workdir", "--install", "--grid"],
                                      ["--workdir", "W", "--bogus"], "bogus"),
}

# `python -m customjax.data.precompute`: the package imports the module before runpy runs it as __main__
# (customjax.data.training), and runpy warns about that on stderr; not the command's message.
_RUNPY = "RuntimeWarning: 'customjax.data.precompute' found in sys.modules"


def _run(module: str, args: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=240)


@pytest.fixture(scope="module")
def results():
    """``{(module, "help" | "bad"): CompletedProcess}``, run three at a time."""
    jobs = {(m, kind): ["--help"] if kind == "help" else bad for m, (_, bad, _) in CLIS.items()
            for kind in ("help", "bad")}
    with concurrent.futures.ThreadPoolExecutor(max_workers=3) as pool:
        futures = {key: pool.submit(_run, key[0], args) for key, args in jobs.items()}
        return {key: f.result() for key, f in futures.items()}


def _stderr_lines(p: subprocess.CompletedProcess) -> list[str]:
    return [ln for ln in p.stderr.splitlines() if ln.strip() and _RUNPY not in ln]


@pytest.mark.parametrize("module", sorted(CLIS))
def test_help_lists_the_commands_own_flags(results, module):
    p = results[module, "help"]
    assert p.returncode == 0, (p.stdout, p.stderr)
    out = p.stdout
    assert out.startswith(f"usage: python -m {module}"), out[:300]
    flags_part = out.split("\nflags:\n", 1)[1].split("\n\n", 1)[0]
    for flag in CLIS[module][0]:
        # "--flag: help", "--[no]flag: help" (booleans) or "--flag: <a|b>: help" (enums)
        name = flag[2:]
        assert f"  --{name}:" in flags_part or f"  --[no]{name}:" in flags_part, (flag, out)
    assert "--verbosity" not in flags_part and "--flagfile" not in flags_part, out   # absl's, not the command's
    assert "Traceback" not in p.stderr and not _stderr_lines(p), p.stderr


@pytest.mark.parametrize("module", sorted(CLIS))
def test_bad_flag_is_one_line_and_exit_code_2(results, module):
    p = results[module, "bad"]
    lines = _stderr_lines(p)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr, p.stderr
    assert len(lines) == 1 and lines[0].startswith(f"{module}: "), p.stderr
    assert CLIS[module][2] in lines[0], lines[0]


def test_help_in_process_and_fresh_flags(capsys, tmp_path):
    """The in-process form (:func:`customjax.cli.call`) parses into a fresh set of flags each call, so a
    value given to one call is not seen by the next, and leaves absl's global flags alone."""
    from absl import flags

    from customjax.data import synthetic

    with pytest.raises(SystemExit) as e:
        synthetic.command(["--help"])
    assert e.value.code == 0 and "--num_text_image" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        synthetic.command([])                     # OUT_DIR missing
    assert e.value.code == 2 and "OUT_DIR" in capsys.readouterr().err
    assert synthetic.command([str(tmp_path / "a"), "--num_text_image", "3", "--num_multiview", "1",
                              "--num_frames", "2", "--size", "16", "--num_shards", "1"]) == 0
    assert synthetic.command([str(tmp_path / "b"), "--num_multiview", "1", "--num_frames", "2", "--size", "16"]) == 0
    from customjax.data import records
    count = lambda d: sum(len(records.read_shard(p)) for p in records.find_shards(d))  # noqa: E731
    assert count(tmp_path / "a" / "text_image") == 3 and count(tmp_path / "b" / "text_image") == 64  # default
    assert "num_text_image" not in flags.FLAGS

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# One persistent compilation cache for the whole session, inherited by the CLI subprocesses: many
# tests (and the resumed / multi-process training runs) compile the same tiny programs. A cache
# folder made here is deleted when this process exits, even after a usage error that ends pytest
# before the session starts (one given in the environment is kept). xdist workers inherit the
# variable, so they share the controller's folder and leave its deletion to the controller.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="customjax-tests-jax-cache-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
# The suite is compile-bound on a CPU: XLA's LLVM backend without its expensive optimisations compiles
# about a third faster (the whole suite on 2 cores: 1094 s -> 892 s; every test's tolerances still
# hold). Subprocesses inherit it; XLA_FLAGS given in the environment are kept (appended to).
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()

import numpy as np
import pytest

# The files that take longest (measured on 2 cores) are collected first: xdist's --dist loadfile hands files
# to the workers in collection order, so these start at once and the short ones fill in at the end, instead
# of one worker running a long file alone while the other idles (the two-process training test is 2+ min).
LONGEST_FIRST = ("test_train.py", "test_finetune.py", "test_readme.py", "test_pretrain.py", "test_train_safety.py",
                 "test_train_run.py", "test_evaluate.py", "test_cli_help.py", "test_real_sizes.py", "test_customcontrast.py")


def pytest_collection_modifyitems(config, items):
    """A stable sort by file: the files of :data:`LONGEST_FIRST` first, in that order; a file's tests stay
    together and in their order (module fixtures are built once)."""
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


def cpu_env(devices: int, **extra) -> dict:
    """The environment of a test's JAX subprocess: this one's (cache, fast-compile flags) on the CPU
    with ``devices`` simulated devices."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    return dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags, **extra)


def max_abs(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def assert_reruns_record(folder, tmp_path, steps: int = 3) -> None:
    """The first ``steps`` steps of every stage of a pretrained ShapeWorld folder, rerun from its record
    (``shapeworld.json``: command config and loss curves), give the recorded losses: the VAE and CLIP
    stages to 1e-4, the UNet's to 2e-2 (its frozen VAE and text tower come from the float16-stored folder).
    A continued base (``config.init``) is checked against the first link of its chain, the run made from
    nothing, whose VAE, CLIP and tokenizer it kept; the continuation's own first steps would need its
    parent's UNet weights, which the folder does not hold (their SHA-256 is recorded)."""
    import json

    import ml_collections

    from customjax.shapeworld.pretrain.lineage import root_record
    from customjax.shapeworld.pretrain.run import fingerprint

    info = root_record(json.loads((folder / "shapeworld.json").read_text()))
    got = fingerprint(ml_collections.ConfigDict(info["config"]), folder, tmp_path, steps=steps)
    for stage, tol in (("vae", 1e-4), ("clip", 1e-4), ("unet", 2e-2)):
        want = dict((s, l) for s, l in info["loss_curves"][stage])
        assert [s for s, _ in got[stage]] == list(range(1, steps + 1)), stage
        for step, loss in got[stage]:
            assert loss == pytest.approx(want[step], rel=tol), (stage, step, loss, want[step])


@pytest.fixture
def report():
    """Prints a parity figure so that `pytest -s` and the CI log show it."""
    def _report(name: str, err: float, tol: float):
        print(f"\n[parity] {name}: max abs error {err:.3e} (tolerance {tol:.0e})")
        assert err <= tol, f"{name}: max abs error {err:.3e} > {tol:.0e}"
    return _report

"""Per-concept fine-tuning runs for tests/test_finetune.py: ``stacked`` trains C concepts in one
stacked step, ``separate`` one at a time, both ``steps`` steps of Custom Diffusion's stage (words +
cross-attention K/V) on the tiny pipeline. As a script (``python tests/finetune_probe.py OUT.npz
DIR...``) it trains the stack on every device of the process (2 simulated devices) and saves it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from configs import custom_diffusion  # noqa: E402
from customjax import parallel  # noqa: E402
from customjax.concepts import stack as S  # noqa: E402
from customjax.concepts.data import ConceptBatches, posteriors  # noqa: E402
from customjax.finetune import prepare, stage_setup, stages  # noqa: E402


def config(steps: int = 3):
    c = custom_diffusion.get_config("tiny")
    c.train.preview_every = 0
    c.stages.train.steps = steps
    c.stages.train.lr = 1e-3
    return c


def run(p, batches, rows, steps: int, compiled: dict | None = None) -> dict:
    """{path: (C, ...)} of the trained tree after ``steps`` stacked steps; ``compiled``: a dict keeping the
    jitted step for further runs of the same shapes (the separate runs compile once)."""
    st = stages(p.config)[0]
    b, frozen, state, tx, step = stage_setup(p.built, st, p.config, rows, [k.name for k in batches.concepts])
    first = {k: v for k, v in batches(0).items() if k != "caption"}
    compiled = {} if compiled is None else compiled
    if "step" not in compiled:
        compiled["step"] = S.compile_stacked(step, p.mesh, state, frozen, parallel.batch_shapes(first, whole=True))
    jstep, state_sh, frozen_sh = compiled["step"]
    state, frozen = jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
    for i in range(steps):
        state, _ = jstep(state, frozen, S.place_batch({k: v for k, v in batches(i).items() if k != "caption"}, p.mesh))
    return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(jax.device_get(state.params)).items()}


def stacked(dirs, steps: int = 3) -> dict:
    p = prepare(config(steps), dirs)
    out = run(p, p.batches, p.rows, steps)
    return {k: v[:len(dirs)] for k, v in out.items()}


def separate(dirs, steps: int = 3) -> dict:
    """The same concepts one at a time (one build; a one-concept stack per concept)."""
    c = config(steps)
    p = prepare(c, dirs, mesh=parallel.make_mesh(1, jax.devices()[:1]))
    outs, compiled = [], {}
    for i, k in enumerate(p.concepts):
        post = posteriors(p.built.pipe, p.built.params["vae"], [k], bool(c.concept.hflip))
        one = ConceptBatches([k], p.built.pipe.tokenizers[0], c, post)
        outs.append(run(p, one, p.rows[i:i + 1], steps, compiled))
    return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


def cli_run(workdir, dirs) -> dict:
    """``customjax.finetune.finetune`` of 4 steps with previews and a curve export (any process count)."""
    from customjax.finetune import finetune
    c = config(4)
    c.train.preview_every, c.train.save_every, c.finetune.curve = 2, 2, (2,)
    return finetune(c, [Path(d) for d in dirs], str(workdir))


if __name__ == "__main__":
    if sys.argv[1] == "--process":      # --process ID PORT WORKDIR DIR...: one of 2 jax.distributed processes
        pid, port, work, *dirs = sys.argv[2:]
        jax.distributed.initialize(f"127.0.0.1:{port}", 2, int(pid))
        print(json.dumps({k: v for k, v in cli_run(work, dirs).items() if k in ("status", "exports")}))
        sys.exit(0)
    out, *dirs = sys.argv[1:]
    assert jax.device_count() == 2, jax.devices()
    np.savez(out, **stacked([Path(d) for d in dirs]))

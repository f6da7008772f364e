"""Concepts per hour of per-concept fine-tuning: C concepts stacked in one jitted step
(:mod:`customjax.concepts.stack`) against one at a time, on this machine's devices.

    python benchmarks/concepts_per_hour.py --config configs/textual_inversion.py:shapeworld --stack 1,2,4,8
    XLA_FLAGS=--xla_force_host_platform_device_count=2 python benchmarks/concepts_per_hour.py ... --tag 2dev

For each stack size C: the train step's compile time and its steady time per step (median of
``--repeats`` timed runs of ``--steps`` steps after a warm-up step), then concepts per hour =
C * 3600 / (time per step * the config's steps per concept), steady state, and end to end (one run of
the command: build, compile, every step). Speed-up = the stack's concepts per hour over C = 1's (one
concept at a time). Concepts are ShapeWorld held-out subjects (4 views each). Writes
``benchmarks/results/concepts_per_hour_<tag>.json`` naming the device.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
from absl import app, flags
from ml_collections import config_flags

from customjax import parallel
from customjax.concepts import stack as S
from customjax.finetune import prepare, stage_setup, stages
from customjax.shapeworld.benchmark.concepts import concept_cases, write_concepts

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", "configs/textual_inversion.py:shapeworld", "per-concept config", lock_config=False)
flags.DEFINE_list("stack", ["1", "2", "4", "8"], "stack sizes C")
flags.DEFINE_integer("steps", 20, "timed steps per repeat")
flags.DEFINE_integer("repeats", 3, "timed repeats (the median is reported)")
flags.DEFINE_string("tag", "cpu", "result file tag")
flags.DEFINE_string("out", "benchmarks/results", "results folder")


def time_stack(config, dirs, C: int) -> dict:
    t0 = time.time()
    p = prepare(config, dirs[:C])
    prepare_s = time.time() - t0
    st = stages(config)[0]
    b, frozen, state, tx, step = stage_setup(p.built, st, config, p.rows, [k.name for k in p.stacked])
    first = {k: v for k, v in p.batches(0).items() if k != "caption"}
    t0 = time.time()
    jstep, state_sh, frozen_sh = S.compile_stacked(step, p.mesh, state, frozen, parallel.batch_shapes(first, whole=True))
    state, frozen = jax.device_put(state, state_sh), jax.device_put(frozen, frozen_sh)
    batches = [S.place_batch({k: v for k, v in p.batches(i).items() if k != "caption"}, p.mesh) for i in range(FLAGS.steps)]
    state, m = jstep(state, frozen, batches[0])
    jax.block_until_ready(m)
    compile_s = time.time() - t0
    times = []
    for _ in range(FLAGS.repeats):
        t0 = time.time()
        for b_ in batches:
            state, m = jstep(state, frozen, b_)
        jax.block_until_ready(m)
        times.append((time.time() - t0) / FLAGS.steps)
    per_step = statistics.median(times)
    total_steps = sum(s.steps for s in stages(config))
    run_s = prepare_s + compile_s + per_step * total_steps       # one run of the command, end to end
    return {"concepts": C, "stacked": len(p.stacked), "prepare_s": round(prepare_s, 2), "compile_s": round(compile_s, 2),
            "step_s": per_step, "step_s_repeats": times, "steps_per_concept": total_steps,
            "concepts_per_hour": C * 3600 / (per_step * total_steps),
            "concepts_per_hour_end_to_end": C * 3600 / run_s}


def main(argv):
    del argv
    config = FLAGS.config
    with config.unlocked():
        config.train.preview_every = 0
    sizes = [int(s) for s in FLAGS.stack]
    with tempfile.TemporaryDirectory() as tmp:
        _, subjects = concept_cases(2 * max(sizes))
        dirs = write_concepts(Path(tmp) / "concepts", subjects[:max(sizes)], size=int(config.train.image_size))
        rows = []
        for C in sizes:
            r = time_stack(config, dirs, C)
            rows.append(r)
            print(f"C={C}: {r['step_s'] * 1e3:.1f} ms/step, {r['concepts_per_hour']:.1f} concepts/h "
                  f"(compile {r['compile_s']} s)", flush=True)
    one = rows[0] if sizes[0] == 1 else None
    for r in rows:
        r["speedup_vs_one_at_a_time"] = None if one is None else r["concepts_per_hour"] / one["concepts_per_hour"]
        r["speedup_end_to_end"] = None if one is None else (r["concepts_per_hour_end_to_end"]
                                                            / one["concepts_per_hour_end_to_end"])
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    out = {"benchmark": "concepts_per_hour", "config": f"{config.method}:{config.variant}",
           "device": str(jax.devices()[0]), "devices": jax.device_count(), "platform": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "xla_flags": os.environ.get("XLA_FLAGS", ""), "jax": jax.__version__,
           "commit": commit, "batch_per_concept": int(config.train.batch), "image_size": int(config.train.image_size),
           "steps_timed": FLAGS.steps, "repeats": FLAGS.repeats, "rows": rows}
    path = Path(FLAGS.out) / f"concepts_per_hour_{FLAGS.tag}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)

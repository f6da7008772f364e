"""Adapter training throughput: examples/s of the jitted train step and, where the device's peak
rate is known, model FLOPs utilisation (FLOPs per step from XLA's cost analysis of the compiled
step, over time and peak).

    python benchmarks/train_step.py --config configs/realcustompp.py:tiny --steps 20
    # GPU, SD-1.5 shapes with random weights at 512px (reference encoders stay tiny unless given):
    python benchmarks/train_step.py --config configs/realcustompp.py:sd15 --full --batch 8 --dtype bfloat16

Writes benchmarks/results/train_step_<variant>_<device>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 peak FLOP/s per device (vendor figures), for MFU.
PEAK = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v5 lite": 197e12, "tpu v5p": 459e12, "tpu v4": 275e12}


def peak_flops(kind: str) -> float | None:
    k = kind.lower()
    return next((v for name, v in PEAK.items() if name in k), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/realcustompp.py:tiny")
    ap.add_argument("--full", action="store_true", help="random weights with the real SD-1.5 / SDXL shapes")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from customjax import parallel, trainer
    from customjax.methods.build import build
    from customjax.methods.objective import ObjectiveConfig
    from customjax.tokenizer import tokenize

    path, variant = (a.config.split(":") + ["tiny"])[:2]
    spec = importlib.util.spec_from_file_location("cfg", ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(variant)
    c.model.dtype = a.dtype
    if a.full:
        c.model.random_scale = "full"
    batch = a.batch or c.train.batch
    built = build(c)
    frozen, train = trainer.split(built)
    tx = trainer.make_optimizer(c.optim)
    state = trainer.init_state(train, tx, jax.random.key(0), ema=False)
    mesh = parallel.make_mesh(c.train.fsdp)
    size = c.train.image_size
    ref = c.encoders.image_size * (c.encoders.scale if c.method == "realcustompp" else 1)
    rng = np.random.default_rng(0)
    host = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
            "reference": rng.uniform(0, 1, (batch, ref, ref, 3)).astype(np.float32),
            "ids": tuple(tokenize(t, ["a photo of a red toy"] * batch) for t in built.pipe.tokenizers)}
    step = trainer.make_train_step(built, tx, ObjectiveConfig(**c.objective))
    shapes = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host)
    f, ssh, fsh, bsh = trainer.compile_step(step, mesh, state, frozen, shapes)
    state, frozen, b = trainer.place(state, ssh), trainer.place(frozen, fsh), trainer.place(host, bsh)
    t0 = time.perf_counter()
    compiled = f.lower(state, frozen, b).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0
    state, m = compiled(state, frozen, b)
    jax.block_until_ready(m)
    times = []
    for _ in range(a.steps):
        t = time.perf_counter()
        state, m = compiled(state, frozen, b)
        jax.block_until_ready(m)
        times.append(time.perf_counter() - t)
    med = float(np.median(times))
    dev = jax.devices()[0]
    kind = getattr(dev, "device_kind", dev.platform)
    peak = peak_flops(kind)
    n_dev = jax.device_count()
    result = {
        "benchmark": "train_step", "config": a.config, "full_scale": a.full, "dtype": a.dtype, "batch": batch,
        "image_size": size, "reference_size": ref, "device": kind, "devices": n_dev, "jax": jax.__version__,
        "git_commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "compile_s": round(compile_s, 2), "step_s_median": med, "step_s_all": times,
        "examples_per_s": batch / med, "examples_per_s_per_device": batch / med / n_dev,
        "flops_per_step": flops, "achieved_flops_per_s": flops / med if flops else None,
        "peak_flops_per_s_per_device": peak,
        "mfu": (flops / med / (peak * n_dev)) if (flops and peak) else None,
        "loss": float(m["loss"]),
    }
    tag = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"train_step_{variant.replace(',', '_')}{'_full' if a.full else ''}_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{a.config} {'full' if a.full else ''} batch {batch} on {n_dev} x {kind}: {med * 1e3:.1f} ms/step, "
          f"{batch / med:.1f} examples/s, {flops / 1e9:.2f} GFLOP/step"
          + (f", MFU {result['mfu']:.1%}" if result["mfu"] else ", MFU n/a (unknown peak)"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

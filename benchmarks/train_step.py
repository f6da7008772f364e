"""Adapter training throughput: examples/s of the jitted train step and, for bfloat16 / float16
runs on a device whose peak rate is known, model FLOPs utilisation (FLOPs per step per device from
XLA's cost analysis of the compiled, partitioned step, over step time and the per-device peak).

    python benchmarks/train_step.py --config configs/realcustompp.py:tiny --steps 20
    # GPU, SD-1.5 shapes with random weights at 512px (reference encoders stay tiny unless given):
    python benchmarks/train_step.py --config configs/realcustompp.py:sd15 --full --batch 8 --dtype bfloat16

The model, mesh, optimizer and step are built as ``python -m customjax.train`` builds them
(:func:`customjax.trainer.setup`: ``config.train.fsdp``, ``config.train.remat``, ...).
Writes benchmarks/results/train_step_<variant>_<device>.json.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# Dense bf16 / fp16 peak FLOP/s per device (vendor figures), for MFU of bfloat16 / float16 runs.
PEAK_BF16 = {"h100": 989e12, "h200": 989e12, "a100": 312e12, "tpu v5 lite": 197e12, "tpu v5p": 459e12,
             "tpu v4": 275e12}
HALF = ("bfloat16", "float16")


def peak_flops(kind: str, dtype: str) -> float | None:
    """The device's dense peak for ``dtype``; None where unknown (float32: TF32 or not depends on
    the backend's matmul precision, so no MFU is claimed)."""
    if dtype not in HALF:
        return None
    k = kind.lower()
    return next((v for name, v in PEAK_BF16.items() if name in k), None)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/realcustompp.py:tiny")
    ap.add_argument("--full", action="store_true", help="random weights with the real SD-1.5 / SDXL shapes")
    ap.add_argument("--batch", type=int, default=None, help="global batch (default: config.train.batch)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", default="float32", help="config.model.dtype")
    ap.add_argument("--remat", action="store_true", help="set config.train.remat")
    ap.add_argument("--fsdp", type=int, default=None, help="config.train.fsdp")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()

    from customjax import parallel, trainer
    from customjax.provenance import git_state
    from customjax.methods.build import reference_size
    from customjax.tokenizer import tokenize

    path, variant = (a.config.split(":") + ["tiny"])[:2]
    spec = importlib.util.spec_from_file_location("cfg", ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    c = mod.get_config(variant)
    c.model.dtype = a.dtype
    if a.full:
        c.model.random_scale = "full"
    if a.batch:
        c.train.batch = a.batch
    if a.remat:
        c.train.remat = True
    if a.fsdp:
        c.train.fsdp = a.fsdp
    batch = c.train.batch
    s = trainer.setup(c)
    size = c.train.image_size
    ref = reference_size(c)
    rng = np.random.default_rng(0)
    host = {"image": rng.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32),
            "reference": rng.uniform(0, 1, (batch, ref, ref, 3)).astype(np.float32),
            "ids": tuple(tokenize(t, ["a photo of a red toy"] * batch) for t in s.built.pipe.tokenizers)}
    f, ssh, fsh = s.compile(parallel.batch_shapes(host))
    state, frozen, b = trainer.place(s.state, ssh), trainer.place(s.frozen, fsh), parallel.shard_batch(host, s.mesh)
    t0 = time.perf_counter()
    compiled = f.lower(state, frozen, b).compile()
    compile_s = time.perf_counter() - t0
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    flops = float(cost.get("flops", 0.0)) if cost else 0.0    # of the partitioned (per-device) program
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
    peak = peak_flops(kind, a.dtype)
    n_dev = jax.device_count()
    result = {
        "benchmark": "train_step", "config": a.config, "full_scale": a.full, "dtype": a.dtype, "batch": batch,
        "remat": bool(c.train.remat), "fsdp": int(c.train.fsdp),
        "image_size": size, "reference_size": ref, "device": kind, "devices": n_dev, "jax": jax.__version__,
        "git": git_state(ROOT),
        "compile_s": round(compile_s, 2), "step_s_median": med, "step_s_all": times,
        "examples_per_s": batch / med, "examples_per_s_per_device": batch / med / n_dev,
        "flops_per_step_per_device": flops, "achieved_flops_per_s_per_device": flops / med if flops else None,
        "peak_flops_per_s_per_device": peak,
        "mfu": (flops / med / peak) if (flops and peak) else None,
        "loss": float(m["loss"]),
    }
    tag = re.sub(r"[^a-z0-9]+", "-", kind.lower()).strip("-")
    out = Path(a.out or ROOT / "benchmarks" / "results" / f"train_step_{variant.replace(',', '_')}{'_full' if a.full else ''}_{tag}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"{a.config} {'full' if a.full else ''} batch {batch} on {n_dev} x {kind}: {med * 1e3:.1f} ms/step, "
          f"{batch / med:.1f} examples/s, {flops / 1e9:.2f} GFLOP/step/device"
          + (f", MFU {result['mfu']:.1%}" if result["mfu"] else f", MFU n/a (no {a.dtype} peak for this device)"))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

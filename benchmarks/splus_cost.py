"""What CustomContrast's S+ text condition costs in a training step, at the real SD-1.5 and SDXL shapes:
XLA's cost analysis of the lowered programs (FLOPs; abstract parameters from the published configs,
nothing allocated, nothing compiled).

* the UNet: its forward pass, and the backward pass to its inputs (the adapter's gradients flow through
  every activation), with one text context per cross-attention layer (L = 16 / 70);
* the S+ text passes (:func:`customjax.pipeline.encode_splus`): the l per-layer tokens through the
  frozen text encoder(s), forward and backward to the tokens (they are trained), B * l rows.

    python benchmarks/splus_cost.py --batch 1 --out benchmarks/results/splus_cost_cpu.json

The issue's target is that the text passes are at most 25% of the step. Each model is costed twice:
one S+ token per cross-attention layer (the paper, ``mfi.tokens="layer"``) and one per transformer model
(``"block"``: SD-1.5 has one layer per model, so the same; SDXL 11 passes for its 70 layers).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
from absl import app, flags

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

FLAGS = flags.FLAGS
SIZES = {"sd15": 512, "sdxl": 1024}


def define_flags() -> None:
    flags.DEFINE_list("models", ["sd15", "sdxl"], "published configs to cost")
    flags.DEFINE_integer("batch", 1, "examples per step")
    flags.DEFINE_string("out", None, "JSON results file")


def flops(f, *args) -> float:
    return float(jax.jit(f).lower(*args).cost_analysis()["flops"])


def cost(model: str, batch: int, share: str = "layer") -> dict:
    from customjax.pipeline import encode_splus, load_stable_diffusion
    from customjax.weights.single_file import PUBLISHED_CONFIGS

    pipe, params = load_stable_diffusion(PUBLISHED_CONFIGS / model, abstract=True)
    sds = jax.ShapeDtypeStruct
    L = pipe.unet.config.num_cross_layers
    lat = SIZES[model] // pipe.vae_scale
    ctx_dim = pipe.unet.config.cross_attention_dim[0]
    z = sds((batch, lat, lat, pipe.unet.config.in_channels), jnp.float32)
    t = sds((batch,), jnp.int32)
    ctx = sds((L, batch, 77, ctx_dim), jnp.float32)
    extra = {}
    if pipe.is_sdxl:
        extra = dict(text_embeds=sds((batch, 1280), jnp.float32), time_ids=sds((batch, 6), jnp.float32))

    def unet_loss(p, z, t, ctx, extra):
        return jnp.mean(pipe.unet.apply({"params": p}, z, t, ctx, **extra) ** 2)

    unet_fwd = flops(unet_loss, params["unet"], z, t, ctx, extra)
    unet_step = flops(jax.grad(unet_loss, argnums=3), params["unet"], z, t, ctx, extra)

    ids = tuple(sds((batch, 77), jnp.int32) for _ in pipe.tokenizers)
    where = sds((batch, 77), jnp.bool_)
    width = sum(e.config.hidden_size for e in pipe.text_encoders)
    of_layer = tuple(range(L)) if share == "layer" else pipe.unet.config.cross_layer_blocks()
    n = max(of_layer) + 1
    tokens = sds((batch, n, width), jnp.float32)

    def text_loss(tp, ids, where, tokens):
        ctx, _ = encode_splus(pipe, tp, ids, where, tokens)
        return jnp.mean(ctx[:, jnp.asarray(of_layer)] ** 2)      # every layer reads its token's text

    text_fwd = flops(text_loss, params["text_encoders"], ids, where, tokens)
    text_step = flops(jax.grad(text_loss, argnums=3), params["text_encoders"], ids, where, tokens)
    return dict(model=model, tokens=share, text_passes=n, image_size=SIZES[model], batch=batch, cross_layers=L,
                unet_forward_tflops=unet_fwd / 1e12, unet_forward_backward_tflops=unet_step / 1e12,
                text_passes_forward_tflops=text_fwd / 1e12, text_passes_forward_backward_tflops=text_step / 1e12,
                text_share_of_step=text_step / (text_step + unet_step))


def main(argv) -> None:
    from customjax.provenance import git_state

    rows = []
    for m in FLAGS.models:
        for share in ("layer", "block"):
            r = cost(m, FLAGS.batch, share)
            rows.append(r)
            print(f"{m} (one S+ token per {share}): UNet fwd+bwd {r['unet_forward_backward_tflops']:.2f} TFLOPs, "
                  f"S+ text passes fwd+bwd {r['text_passes_forward_backward_tflops']:.2f} TFLOPs "
                  f"({r['text_passes']} passes for {r['cross_layers']} layers): {100 * r['text_share_of_step']:.0f}% "
                  "of the step")
    rec = dict(benchmark="splus_cost", device="none (XLA cost analysis of lowered programs, CPU backend)",
               implementation="encode_splus: one batched pass of B * n rows (n = l per layer, or one per transformer "
                              "model: configs/customcontrast.py mfi.tokens), no prefix sharing",
               git=git_state(), results=rows)
    if FLAGS.out:
        Path(FLAGS.out).write_text(json.dumps(rec, indent=2) + "\n")


if __name__ == "__main__":
    define_flags()
    app.run(main)

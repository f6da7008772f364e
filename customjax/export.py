"""Export the trainable weights of a training run to safetensors.

    python -m customjax.export --workdir runs/x [--step N] [--ema] [--public] --out adapter.safetensors

Ours: the method's export names (RealCustom / RealCustom++: ``unet.<torch key>`` and
``<adapter>.<torch key>``; IP-Adapter: the released IP-Adapter names), with the method's name in the
file's metadata (what ``--checkpoint`` of the sample CLI reads). ``--public``: the released code's
format where the method has one (RealCustom++: ``...attn2.to_k_vision.weight``,
``encoder_hidden_states_vision_projection.*``, for a projector of the released structure).
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections
from absl import app, flags

from customjax import trainer
from customjax.checkpoint import Checkpointer

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined on use, so that importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "training run folder", required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
    flags.DEFINE_bool("ema", False, "export the EMA parameters")
    flags.DEFINE_bool("public", False, "use the public RealCustom++ key names")
    flags.DEFINE_string("out", None, "output .safetensors file", required=True)



def export(workdir: str, out: str, step: int | None = None, ema: bool = False, public: bool = False) -> Path:
    from customjax.methods.build import build
    from customjax.weights.safetensors_io import save_file

    config = ml_collections.ConfigDict(json.loads((Path(workdir) / "config.json").read_text()))
    built = build(config)
    frozen, trainable = trainer.split(built)
    tx = trainer.make_optimizer(config.optim)
    state = trainer.init_state(trainable, tx, jax.random.key(0), ema=config.train.ema_decay > 0)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    ckpt = Checkpointer(workdir, async_save=False)
    state, _, _ = ckpt.restore(abstract, step)
    ckpt.close()
    if ema and state.ema is None:
        raise ValueError(f"{workdir}: the run kept no EMA (config.train.ema_decay = 0)")
    params = jax.device_get(state.ema if ema else state.params)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if public:
        return built.method.save_released(out, params)
    save_file(built.method.state_dict(params), out, metadata={"method": built.method.name, "step": str(int(state.step))})
    return out


def main(argv) -> None:
    del argv
    print(export(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.ema, FLAGS.public))


if __name__ == "__main__":
    define_flags()
    app.run(main)

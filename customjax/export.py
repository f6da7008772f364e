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
import numpy as np
from absl import app, flags, logging
from flax.traverse_util import flatten_dict

from customjax import trainer
from customjax.checkpoint import Checkpointer
from customjax.cli import fail, parse_flags

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined on use, so that importing this module defines none)."""
    flags.DEFINE_string("workdir", None, "training run folder", required=True)
    flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")
    flags.DEFINE_bool("ema", False, "export the EMA parameters")
    flags.DEFINE_bool("public", False, "use the public RealCustom++ key names")
    flags.DEFINE_string("out", None, "output .safetensors file", required=True)



def export(workdir: str, out: str, step: int | None = None, ema: bool = False, public: bool = False) -> Path:
    """Writes the trainable tree of the run's checkpoint ``step`` (default: the newest that reads;
    an unreadable newer one is named and passed over) to ``out``; returns the path. Everything is
    checked before the model is built: the run folder, its checkpoints, the config they recorded."""
    from customjax.methods.build import build
    from customjax.weights.safetensors_io import save_file

    run = Path(workdir)
    if not run.is_dir():
        raise FileNotFoundError(f"--workdir {workdir}: no such folder")
    ckpt = Checkpointer(workdir, async_save=False)
    steps = ckpt.all_steps()
    if not steps:
        raise FileNotFoundError(f"--workdir {workdir}: no checkpoint in {ckpt.dir}")
    if step is not None and step not in steps:
        raise FileNotFoundError(f"--step {step}: {ckpt.dir} holds steps {sorted(steps)}")
    tried = [step] if step is not None else steps
    saved = None
    for s_ in tried:
        try:
            saved = ckpt.read_meta(s_).get("config")
            break
        except Exception:  # noqa: BLE001  (read below, where the error is named)
            continue
    if saved is None:
        if not (run / "config.json").is_file():
            raise FileNotFoundError(f"--workdir {workdir}: no config recorded in its checkpoints and no config.json")
        saved = json.loads((run / "config.json").read_text())
    config = ml_collections.ConfigDict(saved)
    built = build(config)
    _, trainable = trainer.split(built)
    tx = trainer.make_optimizer(config.optim)
    state = trainer.init_state(trainable, tx, jax.random.key(0), ema=config.train.ema_decay > 0)
    abstract = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)
    used, state, _, _, unreadable = ckpt.restore_readable(abstract, tried)
    ckpt.close()
    for s_, err in unreadable:
        logging.error("checkpoint step %d cannot be read (%s); exporting step %d", s_, err, used)
    if ema and state.ema is None:
        raise ValueError(f"{workdir}: the run kept no EMA (config.train.ema_decay = 0)")
    params = jax.device_get(state.ema if ema else state.params)
    bad = ["/".join(map(str, k)) for k, v in flatten_dict(params).items() if not np.all(np.isfinite(v))]
    if bad:
        raise ValueError(f"{workdir}: step {used} holds non-finite parameters ({bad[:5]}); not exported")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    logging.info("exporting step %d of %s", used, workdir)
    if public:
        return built.method.save_released(out, params)
    save_file(built.method.state_dict(params), out, metadata={"method": built.method.name, "step": str(used)})
    return out


def main(argv) -> None:
    del argv
    try:
        print(export(FLAGS.workdir, FLAGS.out, FLAGS.step, FLAGS.ema, FLAGS.public))
    except FileNotFoundError as e:
        fail("customjax.export", str(e))


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=parse_flags("customjax.export", ()))

"""Batch sampling with any registered method (one jitted dual-branch sampler).

    python -m customjax.sample --config configs/realcustompp.py:sdxl --checkpoint CKPT \
        --prompts cases.jsonl --config.model.path /path/to/sdxl --config.encoders.siglip ... 

``--prompts`` is a JSONL file, one case a line::

    {"prompt": "a toy on the beach", "words": ["toy"], "references": ["toy.png"], "seeds": [0, 1]}

(or ``--prompt`` / ``--word`` / ``--reference`` flags for one case); ``"masks": ["left.png", ...]``, one
per word, fixes the subjects' masks to a drawn layout (sampled with ``t_stop = 0``: no attention masks).
Every case is checked before anything compiles: the target words must be in the prompt, the
references and masks must be readable images. Writes per image a PNG, the final masks over it
(``*_mask.png``), the per-step mask strip (``*_steps.png``), ``grid.png`` (one row per case: the prompt,
the reference(s), each sample and its masks, at least 256 px) and ``record.json`` with every setting and
seed. The command is a thin wrapper over :class:`customjax.api.Customizer`.
"""

from __future__ import annotations

from absl import app, flags
from ml_collections import config_flags

from customjax.api import Customizer
from customjax.base_model import check_config_paths, first_tokenizer
from customjax.cli import fail, parse_flags
from customjax.methods.build import check_checkpoint, guidance_config
from customjax.sampling.cases import CaseError, check_cases, read_cases

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command's flags (defined on use, so that importing this module defines none)."""
    config_flags.DEFINE_config_file("config", None, "method config file[:variant[,ablation...]]", lock_config=True)
    flags.DEFINE_string("checkpoint", None, "adapter checkpoint (folder with adapter.safetensors, or the public "
                        "RealCustom++ file); without it the adapter is randomly initialised")
    flags.DEFINE_string("prompts", None, "JSONL file of cases (prompt, words, references, seeds)")
    flags.DEFINE_string("prompt", None, "one prompt (with --word and --reference)")
    flags.DEFINE_multi_string("word", [], "target real word(s) of --prompt")
    flags.DEFINE_multi_string("reference", [], "reference image(s) of --prompt")
    flags.DEFINE_multi_string("mask", [], "layout mask image(s) of --prompt, one per --word (optional)")
    flags.DEFINE_list("seeds", None, "seeds for every case (default: the case's own, else config.sample.seeds)")
    flags.DEFINE_string("out", None, "output folder (default: config.sample.out)")
    flags.DEFINE_multi_string("concept", [], "a concept export of customjax.finetune loaded into the base "
                              "(its words, text encoder, LoRA / K, V; repeatable)")


def flag_cases() -> list[dict]:
    """The cases the flags name: ``--prompts`` (a JSONL file) or ``--prompt`` / ``--word`` / ``--reference``."""
    if FLAGS.prompts:
        return read_cases(FLAGS.prompts)
    if FLAGS.prompt:
        return [{"prompt": FLAGS.prompt, "words": FLAGS.word, "references": FLAGS.reference,
                 "masks": FLAGS.mask or None, "_where": "flags"}]
    raise CaseError("give --prompts FILE.jsonl, or --prompt with --word and --reference")


def main(argv) -> None:
    del argv
    cfg = FLAGS.config
    if cfg is None:
        fail("customjax.sample", "--config is required, e.g. --config configs/realcustompp.py (the ShapeWorld default) "
             "or configs/realcustompp.py:tiny")
    try:
        check_config_paths(cfg)
        gcfg = guidance_config(cfg)
        cases = check_cases(flag_cases(), first_tokenizer(cfg), gcfg.references, list(cfg.sample.seeds),
                            seeds_override=FLAGS.seeds, words_required=gcfg.masked)
        if FLAGS.checkpoint:          # before the models are built (minutes for SDXL)
            check_checkpoint(FLAGS.checkpoint, cfg.method)
    except (FileNotFoundError, ValueError) as e:
        fail("customjax.sample", str(e))
    try:
        pipe = Customizer.from_config(cfg, FLAGS.checkpoint, concepts=FLAGS.concept)
    except (FileNotFoundError, ValueError) as e:
        fail("customjax.sample", str(e))
    samples = pipe.sample_cases(cases, progress=True)
    out = samples.save(FLAGS.out or cfg.sample.out)
    print(f"customjax.sample: {len(samples.images)} images, their masks and grid.png in {out} "
          f"({samples.record['seconds']:.0f} s)")


def run() -> None:
    define_flags()
    app.run(main, flags_parser=parse_flags("customjax.sample"))


if __name__ == "__main__":
    run()

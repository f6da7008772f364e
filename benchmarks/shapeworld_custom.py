"""ShapeWorld customization benchmark (issue 6): held-out subjects in new contexts, sampled with
plain text-to-image, the unmasked adapter at four visual scales, RealCustom++ AMG and its mask /
gamma_scope / early-stop ablations, RealCustom, and two-subject cases (Algorithm 1 vs overlapping
masks); scored exactly (controllability, appearance similarity) and with the model's own CLIP.

    python benchmarks/shapeworld_custom.py --config configs/realcustompp.py:shapeworld \
        --checkpoint runs/sw/export [--realcustom_config configs/realcustom.py:shapeworld \
        --realcustom_checkpoint runs/sw_rc/export] --cases 20 --seeds 0,1 --steps 25 \
        --out docs/shapeworld/customization_benchmark
    python benchmarks/shapeworld_custom.py --config configs/realcustompp.py:tiny --fast --out /tmp/sw

Writes ``results.json`` (every figure, setting, case, seed, the device and commit), ``results.md``
(tables grouped like RealCustom++ Tables V-VII / X-XII), ``frontier.png`` (similarity against
controllability: the unmasked frontier and the masked settings) and ``samples.png``. ``--fast``:
2 cases, 1 two-subject case, 1 seed, 4 steps, the settings marked fast (t2i, the four unmasked
scales, AMG, the layout oracle, two subjects with Algorithm 1: three compiled samplers).
Definitions: ``customjax/shapeworld/benchmark/`` (cases, settings, generate, scoring, report; run: ``shapeworld.py``).
"""

from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

from customjax.shapeworld.benchmark.report import markdown, write_report
from customjax.shapeworld.benchmark.settings import SETTING_NAMES, SETTINGS, config_apply_variant, with_steps
from customjax.shapeworld.benchmark.shapeworld import run_benchmark

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "RealCustom++ config file[:variant[,ablation...]]", lock_config=False)
config_flags.DEFINE_config_file("realcustom_config", None, "RealCustom config (the `realcustom` setting; "
                                "skipped without it)", lock_config=False)
flags.DEFINE_string("checkpoint", None, "RealCustom++ adapter folder (adapter.safetensors); none = random adapter")
flags.DEFINE_string("realcustom_checkpoint", None, "RealCustom adapter folder; none = random adapter")
flags.DEFINE_multi_string("model", [], "a further trained model, NAME=CONFIG_FILE:VARIANT[,PRESET...]@CHECKPOINT "
                          "(e.g. cc=configs/customcontrast.py:shapeworld@runs/sw_cc/export), sampled with its "
                          "config's own settings as settings NAME and NAME_two; repeatable")
flags.DEFINE_integer("cases", 20, "single-subject cases")
flags.DEFINE_integer("prompts_per_subject", 2, "consecutive cases sharing one held-out subject")
flags.DEFINE_integer("pairs", None, "two-subject cases (default: cases // 2)")
flags.DEFINE_integer("case_seed", 0, "seed of the case set")
flags.DEFINE_list("seeds", ["0", "1"], "sampling seeds (initial noise), the same for every setting")
flags.DEFINE_integer("steps", None, "sampling steps (default: the config's); T_stop is rescaled in proportion")
flags.DEFINE_integer("batch", None, "images per sampler call (default: config.sample.batch)")
flags.DEFINE_list("settings", None, f"settings to run (default: all): {','.join(SETTING_NAMES)}")
flags.DEFINE_bool("fast", False, "2 cases, 1 pair, seed 0, 4 steps, the fast settings (explicit flags win)")
flags.DEFINE_string("out", "docs/shapeworld/customization_benchmark", "output folder")
flags.DEFINE_bool("progress", True, "progress bar")


def parse_model(text: str, steps: int):
    """``NAME=CONFIG_FILE:ARG@CHECKPOINT`` (``@CHECKPOINT`` optional: a random adapter) -> (name, config
    with ``steps`` sampling steps, checkpoint)."""
    from customjax.api import load_config

    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise app.UsageError(f"--model {text!r}: expected NAME=CONFIG_FILE:VARIANT[,PRESET...]@CHECKPOINT")
    spec, _, checkpoint = rest.partition("@")
    return name, with_steps(load_config(spec), steps), checkpoint or None


def main(argv) -> None:
    del argv
    if FLAGS.config is None:
        raise app.UsageError("--config is required, e.g. --config configs/realcustompp.py:shapeworld")
    fast = FLAGS.fast
    given = lambda name: FLAGS[name].present
    cases = 2 if fast and not given("cases") else FLAGS.cases
    pps = 1 if fast and not given("prompts_per_subject") else FLAGS.prompts_per_subject
    pairs = FLAGS.pairs if given("pairs") else (1 if fast else max(cases // 2, 1))
    seeds = [0] if fast and not given("seeds") else [int(s) for s in FLAGS.seeds]
    steps = 4 if fast and not given("steps") else FLAGS.steps
    settings = FLAGS.settings or [s.name for s in SETTINGS if s.fast or not fast]
    cfg = with_steps(FLAGS.config, steps)
    rc = None if FLAGS.realcustom_config is None else with_steps(FLAGS.realcustom_config, cfg.sample.steps)
    config_file = FLAGS["config"].config_filename
    models = [parse_model(m, cfg.sample.steps) for m in FLAGS.model]
    report, extra = run_benchmark(
        cfg, checkpoint=FLAGS.checkpoint, apply_variant=config_apply_variant(config_file), settings=settings,
        rc_cfg=rc, rc_checkpoint=FLAGS.realcustom_checkpoint, cases=cases, prompts_per_subject=pps, pairs=pairs,
        case_seed=FLAGS.case_seed, seeds=seeds, batch=FLAGS.batch, progress=FLAGS.progress, models=models)
    report["command"] = " ".join(sys.argv)
    paths = write_report(report, extra, FLAGS.out)
    print(markdown(report))
    print("wrote " + ", ".join(str(p) for p in paths.values()) + f" ({report['seconds']} s)")


if __name__ == "__main__":
    app.run(main)

"""The shipped ShapeWorld base model (``customjax/shapeworld/assets/shapeworld_base``, issue 5): it loads with
the Stable Diffusion loader, its record names the command that made it, the first steps of that
command rerun from the record give the recorded losses, and a fresh measurement on held-out prompts
agrees with the recorded quality figures (which the README states)."""

import json

import pytest

from customjax.shapeworld.assets import SHAPEWORLD_BASE
from customjax.pipeline import load_stable_diffusion
from customjax.shapeworld.pretrain.loop import FINGERPRINT_STEPS

FRESH_PROMPTS = 48     # a fresh sample of held-out prompts (other seed than the recorded evaluation)


@pytest.fixture(scope="module")
def info():
    assert SHAPEWORLD_BASE.is_dir(), f"{SHAPEWORLD_BASE} is missing: the package ships it (see README, ShapeWorld)"
    return json.loads((SHAPEWORLD_BASE / "shapeworld.json").read_text())


def test_shipped_base_loads_small_and_records_its_command(info):
    pipe, params = load_stable_diffusion(SHAPEWORLD_BASE)
    assert pipe.unet.config.sample_size * pipe.vae_scale == info["config"]["size"] == 64
    assert pipe.schedule.prediction_type == info["config"]["unet"]["prediction_type"]
    size = sum(p.stat().st_size for p in SHAPEWORLD_BASE.rglob("*") if p.is_file())
    assert size < 16 * 2 ** 20, f"the shipped folder is {size / 2 ** 20:.1f} MiB"
    # recorded before the pretraining moved into customjax.shapeworld (same code, older module path)
    module, _, rest = info["command"].partition(" --config ")
    assert module in ("python -m customjax.pretrain", "python -m customjax.shapeworld.pretrain"), module
    assert rest.startswith("configs/shapeworld_base.py:"), rest
    for stage in ("vae", "clip", "unet"):
        steps = [s for s, _ in info["loss_curves"][stage]]
        assert steps[-1] == info["config"][stage]["steps"], stage      # every stage ran to the end


@pytest.mark.slow
def test_shipped_base_reruns_the_recorded_start_of_its_command(tmp_path):
    """Bitwise regeneration of the whole CPU run is not promised (float reduction order varies by
    machine, the weights are stored in float16); the first steps of every stage are."""
    from conftest import assert_reruns_record

    assert_reruns_record(SHAPEWORLD_BASE, tmp_path, steps=FINGERPRINT_STEPS)


@pytest.mark.slow
def test_shipped_base_quality_on_fresh_held_out_prompts(info):
    """The recorded figures hold up on the model itself: a fresh sample of held-out prompts (other seed)
    is consistent with the aims (background 0.9, category 0.8; issue 5) and agrees with every recorded
    rate within sampling error."""
    from customjax.shapeworld.pretrain.evaluate import evaluate

    rec = info["eval"]["summary"]
    s = info["eval"]["settings"]
    fresh = evaluate(SHAPEWORLD_BASE, prompts=FRESH_PROMPTS, steps=s["steps"], guidance=s["guidance"],
                     batch=FRESH_PROMPTS // 2, seed=s["seed"] + 1, sampler=s["sampler"])["summary"]
    keys = ("background_correct", "category_correct", "position_correct", "size_correct", "color_correct")
    print("\n[shipped base] recorded (%d prompts) / fresh (%d): " % (rec["background_correct"]["n"], FRESH_PROMPTS)
          + ", ".join(f"{k} {rec[k]['mean']:.3f} / {fresh[k]['mean']:.3f}" for k in keys))
    # and the model itself, not only its record: the fresh sample must be consistent with the category aim
    # (its 95% interval reaches 0.8; the 768k base, category 0.645, would not at 48 prompts)
    assert fresh["category_correct"]["hi"] >= 0.8, fresh["category_correct"]
    assert fresh["background_correct"]["hi"] >= 0.9, fresh["background_correct"]
    for key in keys:
        # 48 Bernoulli draws: a standard error of at most 0.072; allow three
        assert abs(fresh[key]["mean"] - rec[key]["mean"]) < 0.22, (key, fresh[key], rec[key])

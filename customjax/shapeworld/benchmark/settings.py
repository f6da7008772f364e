"""The benchmark's sampling settings (:data:`SETTINGS`): config overrides of the base (RealCustom++)
config, the papers' ablation presets (``configs/common.py: ABLATIONS``) where they exist:

  * ``t2i``: no reference (``t_stop=0``, constant all-zero mask: the visual branch contributes
    nothing; exactly plain CFG text-to-image with weight ``guidance.w``);
  * ``described``: as ``t2i``, with the subject's colours and pattern named in the prompt
    (:attr:`~customjax.shapeworld.benchmark.cases.Case.described_prompt`): what the base model renders when the text
    carries the appearance, the similarity a reference would have to match (CLIP-T is still scored
    against the case's own prompt);
  * ``unmasked_sXXX``: the adapter everywhere at visual scale s (``t_stop=0``, constant mask = s,
    ``visual_scale=1``: the visual attention output is multiplied by mask x scale, so a constant
    mask s is the unmasked adapter at scale s; the guidance branch never runs). The four scales and
    ``t2i`` (s = 0) differ only in a traced input and share one compiled sampler;
  * ``amg`` (the config as given: AMG), ``binary``, ``cross_only`` (``no_amg_s``), ``gamma0XX``,
    ``tstop`` (= amg) / ``no_early_stop``;
  * ``realcustom``: the RealCustom adapter (``--realcustom_config`` / ``--realcustom_checkpoint``;
    scoring module, Eq. 13 two-scale CFG, its own mask settings);
  * ``two_algorithm1`` / ``two_overlap``: two-subject cases, Many2Many references, disjoint masks
    (Algorithm 1) or independent, possibly overlapping Top-K;
  * a further trained model (``--model NAME=CONFIG@CHECKPOINT``, :func:`model_settings`): ``NAME`` (one
    subject) and ``NAME_two`` (two subjects, Many2Many references), each with its config's own
    sampling (CustomContrast: location masks, Sec. 3.4), in the ``models`` group;
  * ``layout`` / ``two_layout``: no attention masks; each subject's mask is fixed to its named place
    (:func:`~customjax.shapeworld.benchmark.cases.place_masks`, value 1, ``t_stop=0``): what mask guidance gives
    when the masks are right (an oracle of the mask, not of the image). ``layout`` shares ``t2i``'s
    compiled sampler.

Settings that resolve to the same sampler configuration and constant mask are sampled once
(``same_as`` in the report).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable


@dataclasses.dataclass(frozen=True)
class Setting:
    """How to sample: ``ablations`` (``configs/common.py: ABLATIONS`` presets, applied by the config's
    ``apply_variant``) then ``guidance`` overrides of ``config.guidance``, on the RealCustom++ config
    (``method="realcustompp"``) or the RealCustom one; ``init_mask``: the constant mask before the
    first guidance mask (with ``t_stop=0``: the mask throughout)."""

    name: str
    group: str
    label: str
    method: str = "realcustompp"
    ablations: tuple[str, ...] = ()
    guidance: tuple[tuple[str, Any], ...] = ()
    init_mask: float = 0.0
    subjects: int = 1
    fast: bool = False
    described: bool = False      # sample with Case.described_prompt (the appearance in words)
    layout: bool = False         # each subject's mask fixed to its named place (cases.place_masks)

    @property
    def own_masks(self) -> bool:
        """Whether the final masks are the setting's own (made by the guidance branch, or a layout), not
        a constant: the settings that :func:`~customjax.shapeworld.benchmark.scoring.mask_scores` applies to."""
        return self.layout or dict(self.guidance).get("t_stop") != 0


GROUPS = {
    "frontier": "Unmasked-adapter frontier (RealCustom++ Fig. 1(c) / 2): text-to-image and the adapter everywhere",
    "mask": "Mask construction (RealCustom++ Tables V, XII; AMG = cross-attn + self-attn augmentation, max norm)",
    "gamma": "Top-K ratio gamma_scope (RealCustom++ Table VI)",
    "early_stop": "Early stop of the guidance branch (RealCustom++ Table VII / XII AMG-T)",
    "realcustom": "RealCustom (conference version: adaptive scoring module, Eq. 13 guidance)",
    "described": "No reference, the subject's appearance named in the prompt (what the base renders from words)",
    "two_subject": "Two subjects, Many2Many references (RealCustom++ Algorithm 1 vs overlapping masks)",
    "layout": "Masks fixed to the named places (an oracle of the mask: what guidance gives when the masks are right)",
    "models": "Further trained models (--model), each sampled with its config's own settings",
    "models_two": "Further trained models, two subjects (Many2Many references)",
}
_NOMASK = (("t_stop", 0), ("visual_scale", 1.0))
SETTINGS: tuple[Setting, ...] = (
    Setting("t2i", "frontier", "text-to-image (no reference, s = 0)", guidance=_NOMASK, init_mask=0.0, fast=True),
    *(Setting(f"unmasked_s{int(s * 100):03d}", "frontier", f"adapter without mask, s = {s}", guidance=_NOMASK,
              init_mask=s, fast=True) for s in (0.25, 0.5, 0.75, 1.0)),
    Setting("amg", "mask", "RealCustom++ AMG (default)", fast=True),
    Setting("binary", "mask", "w/o mask norm (binary mask)", ablations=("binary",)),
    Setting("cross_only", "mask", "cross-attn only (w/o AMG-S self-attn augmentation)", ablations=("no_amg_s",)),
    *(Setting(f"gamma{int(g * 100):03d}", "gamma", f"gamma_scope = {g}", ablations=(f"gamma{int(g * 100):03d}",))
      for g in (0.1, 0.2, 0.3, 0.5)),
    Setting("tstop", "early_stop", "early stop at T_stop (AMG-T)"),
    Setting("no_early_stop", "early_stop", "w/o early stop (guidance every step)", ablations=("no_early_stop",)),
    Setting("realcustom", "realcustom", "RealCustom (scoring module, Eq. 13 CFG)", method="realcustom"),
    Setting("described", "described", "text-to-image, appearance named in the prompt", guidance=_NOMASK,
            described=True),
    Setting("two_algorithm1", "two_subject", "two subjects, Algorithm 1 (disjoint masks)",
            guidance=(("references", "many2many"), ("multi", "algorithm1")), subjects=2, fast=True),
    Setting("two_overlap", "two_subject", "two subjects, masks may overlap", ablations=("overlap",),
            guidance=(("references", "many2many"),), subjects=2),
    Setting("layout", "layout", "mask fixed to the subject's named place", guidance=_NOMASK, layout=True, fast=True),
    Setting("two_layout", "two_subject", "two subjects, masks fixed to their named places (disjoint)",
            guidance=(("references", "many2many"), *_NOMASK), subjects=2, layout=True),
)
SETTING_NAMES = tuple(s.name for s in SETTINGS)


def model_settings(name: str, cfg) -> tuple[Setting, Setting]:
    """The two settings of a further model ``name`` (its key in the benchmark's configs): its config
    as given on the single-subject cases, and on the two-subject cases with one reference per word."""
    label = f"{name} ({cfg.method}" + (f", {cfg.ablations}" if cfg.get("ablations") else "") + ")"
    return (Setting(name, "models", label, method=name),
            Setting(f"{name}_two", "models_two", label, method=name, guidance=(("references", "many2many"),),
                    subjects=2))


NOT_ABLATIONS = ("public",)   # config extras that are no ablation (the released projector)


def base_ablations(cfg) -> list[str]:
    """The ablation presets ``cfg`` was built with (``:variant,a,b`` -> ``[a, b]``), without :data:`NOT_ABLATIONS`."""
    return [a for a in (cfg.get("ablations") or "").split(",") if a and a not in NOT_ABLATIONS]


def setting_config(base, setting: Setting, apply_variant: Callable):
    """A copy of ``base`` with the setting's presets applied by the config's own ``apply_variant``
    (``configs/common.py``), then its ``guidance`` overrides (masks are not recorded). ``base`` must
    carry no ablation itself: every setting (``amg`` is the config as given) would silently include it."""
    given = base_ablations(base)
    if given:
        raise ValueError(f"setting {setting.name}: the config already applies ablation(s) {given}; the benchmark "
                         "applies each setting's own presets: give the bare variant (e.g. ':shapeworld')")
    c = base.copy_and_resolve_references()
    extras = [a for a in (c.get("ablations") or "").split(",") if a]   # "public": re-applied, idempotent
    c = apply_variant(c, [*extras, *setting.ablations])
    c.guidance.update(dict(setting.guidance))
    c.sample.record_masks = False
    return c


def with_steps(cfg, steps: int | None):
    """``cfg`` with ``steps`` sampling steps and T_stop rescaled in proportion (the papers use half)."""
    c = cfg.copy_and_resolve_references()
    if steps and steps != c.sample.steps:
        if c.guidance.t_stop is not None:
            c.guidance.t_stop = max(1, round(c.guidance.t_stop * steps / c.sample.steps))
        c.sample.steps = steps
    return c


def config_apply_variant(config_file: str | Path) -> Callable:
    """``apply_variant(config, presets)`` of a config file (``configs/<method>.py``): the shared
    ``configs.common.apply_variant`` with that file's own ``PRESETS``."""
    import importlib

    stem = Path(str(config_file).split(":")[0]).stem
    module = importlib.import_module(f"configs.{stem}")
    common = importlib.import_module("configs.common")
    return lambda c, extras: common.apply_variant(c, extras, getattr(module, "PRESETS", {}))

"""RealCustom++ curriculum training recipe (Sec. III-C2) as pure functions of the training step.

* Data mixture, Eq. 10: ``P_multiview(S_cur) = S_cur / S_total``, ``P_generic = 1 - P_multiview``.
* Reference crop, Eq. 11: ``r_cur = r_min + (r_max - r_min) * S_cur / S_total``,
  ``r ~ U(r_min, r_cur)``; the reference is resized to ``size * r`` and a ``size`` patch is cropped
  at random (``r_min = 1``, ``r_max = sqrt(10)``: the patch keeps down to 10% of the area).
* Table X rows as presets of the two switches (:data:`TABLE_X`).

Steps past ``S_total`` are clipped to ``S_total``.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

DATA_MODES = ("text_image_only", "multiview_only", "fixed", "curriculum")
CROP_MODES = ("off", "fixed", "curriculum")
R_MIN = 1.0
R_MAX = math.sqrt(10.0)


def progress(step: int, total_steps: int) -> float:
    """``S_cur / S_total`` clipped to [0, 1]."""
    if total_steps <= 0:
        raise ValueError(f"total_steps must be positive, got {total_steps}")
    return min(max(step / total_steps, 0.0), 1.0)


def multiview_probability(step: int, total_steps: int, mode: str = "curriculum", fixed_p: float = 0.5) -> float:
    """Probability that the element at ``step`` comes from the multiview data (Eq. 10 for ``curriculum``)."""
    if mode == "curriculum":
        return progress(step, total_steps)
    if mode == "fixed":
        return fixed_p
    if mode == "text_image_only":
        return 0.0
    if mode == "multiview_only":
        return 1.0
    raise ValueError(f"unknown data mode {mode!r}; choose from {DATA_MODES}")


def crop_ratio_bound(step: int, total_steps: int, r_min: float = R_MIN, r_max: float = R_MAX) -> float:
    """``r_cur`` of Eq. 11."""
    return r_min + (r_max - r_min) * progress(step, total_steps)


def crop_ratio(step: int, total_steps: int, rng: np.random.Generator, mode: str = "curriculum",
               r_min: float = R_MIN, r_max: float = R_MAX) -> float:
    """The reference resize ratio: 1 (``off``), ``U(r_min, r_max)`` (``fixed``) or ``U(r_min, r_cur)``
    (``curriculum``, Eq. 11). Draws exactly one uniform from ``rng`` in every mode."""
    u = float(rng.uniform())
    if mode == "curriculum":
        hi = crop_ratio_bound(step, total_steps, r_min, r_max)
    elif mode == "fixed":
        hi = r_max
    elif mode == "off":
        return 1.0
    else:
        raise ValueError(f"unknown crop mode {mode!r}; choose from {CROP_MODES}")
    return r_min + (hi - r_min) * u


@dataclasses.dataclass(frozen=True)
class Recipe:
    """The two switches of Table X plus the constants of Eqs. 10-11."""

    data: str = "curriculum"
    crop: str = "curriculum"
    fixed_p: float = 0.5
    r_min: float = R_MIN
    r_max: float = R_MAX

    def __post_init__(self):
        if self.data not in DATA_MODES:
            raise ValueError(f"unknown data mode {self.data!r}; choose from {DATA_MODES}")
        if self.crop not in CROP_MODES:
            raise ValueError(f"unknown crop mode {self.crop!r}; choose from {CROP_MODES}")
        if not 1.0 <= self.r_min <= self.r_max:
            raise ValueError(f"need 1 <= r_min <= r_max, got r_min={self.r_min}, r_max={self.r_max}")

    @property
    def needs(self) -> tuple[str, ...]:
        """The data kinds this recipe reads."""
        return {"text_image_only": ("text_image",), "multiview_only": ("multiview",)}.get(
            self.data, ("text_image", "multiview"))

    def p_multiview(self, step: int, total_steps: int) -> float:
        return multiview_probability(step, total_steps, self.data, self.fixed_p)

    def crop_ratio(self, step: int, total_steps: int, rng: np.random.Generator) -> float:
        return crop_ratio(step, total_steps, rng, self.crop, self.r_min, self.r_max)


# RealCustom++ Table X: ablation of the curriculum training recipe.
TABLE_X = {
    "table10_no1": Recipe(data="text_image_only", crop="off"),
    "table10_no2": Recipe(data="multiview_only", crop="off"),
    "table10_no3": Recipe(data="fixed", crop="off", fixed_p=0.5),
    "table10_no4": Recipe(data="curriculum", crop="off"),
    "table10_no5": Recipe(data="curriculum", crop="fixed"),
    "table10_no6": Recipe(data="curriculum", crop="curriculum"),  # the full recipe
}
# Named presets: the full recipe (Table X No. 6), and text-image reconstruction alone (No. 1: the
# conference version's training).
RECIPES = {**TABLE_X, "curriculum": TABLE_X["table10_no6"], "text_image": TABLE_X["table10_no1"]}


def recipe(name_or_recipe: str | Recipe) -> Recipe:
    """A :class:`Recipe` from a preset name (``table10_no1`` .. ``table10_no6``, ``curriculum``,
    ``text_image``) or a recipe."""
    if isinstance(name_or_recipe, Recipe):
        return name_or_recipe
    if name_or_recipe not in RECIPES:
        raise ValueError(f"unknown recipe {name_or_recipe!r}; choose from {sorted(RECIPES)}")
    return RECIPES[name_or_recipe]

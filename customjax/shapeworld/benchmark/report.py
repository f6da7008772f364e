"""The benchmark's report: ``results.json``, a markdown table per settings group (:func:`markdown`),
the similarity / controllability plot (:func:`plot`) and the sample grid (:func:`sample_grid`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from customjax.shapeworld.benchmark.settings import GROUPS, SETTING_NAMES
from customjax.images import grid, to_uint8


def _fmt(summary: dict, key: str) -> str:
    v = summary.get(key)
    if v is None:
        return "-"
    return f"{v['mean']:.3f} [{v['lo']:.3f}, {v['hi']:.3f}]"


def markdown(report: dict) -> str:
    cols = (("controllability", "Controllability"), ("background_correct", "Background"),
            ("position_correct", "Position"), ("placed_any", "Position (any shape)"), ("others_correct", "Other objects"),
            ("similarity", "Similarity"),
            ("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("mask_mean", "Mask cover"),
            ("mask_on_place", "Mask on place"), ("mask_overlap", "Mask overlap"))
    lines = ["# ShapeWorld customization benchmark", "",
             f"Device {report['device']['kind']} ({report['device']['platform']}), commit "
             f"{(report.get('commit') or '?')[:12]}{' (dirty)' if report.get('dirty') else ''}; "
             f"{report['steps']} {report['sampler']} steps, {report['image_size']} px; seeds {report['seeds']}; "
             f"{sum(1 for c in report['cases'] if len(c['words']) == 1)} single-subject and "
             f"{sum(1 for c in report['cases'] if len(c['words']) == 2)} two-subject held-out cases; "
             f"checkpoint `{report.get('checkpoint')}`.", "",
             f"Mean [95% interval] over cases x seeds (Wilson intervals for the yes / no scores). "
             f"{report['definition']}.", ""]
    lines += [f"Note: {n}" for n in report["notes"]] + [""]
    groups = {}
    for s in report["settings"]:
        groups.setdefault(s["group"], []).append(s)
    for g, title in GROUPS.items():
        if g not in groups:
            continue
        lines += [f"## {title}", "", "| Setting | " + " | ".join(c[1] for c in cols) + " | UNet evals / img |",
                  "|---" * (len(cols) + 2) + "|"]
        gt = report.get("ground_truth", {}).get("2" if g == "two_subject" else "1")
        if gt and g in ("frontier", "two_subject", "layout"):
            lines.append("| ground-truth render of the prompt's scene (ceiling) | "
                         + " | ".join(_fmt(gt, c[0]) for c in cols) + " | - |")
        for s in groups[g]:
            g_ = s["guidance"]
            label = s["label"] + (f" (gamma_scope {g_['gamma_scope']}, T_stop {g_['t_stop']})"
                                  if s["name"] in ("amg", "tstop", "realcustom") else "")
            label += f" (= {s['same_as']})" if s["same_as"] else ""
            lines.append(f"| {label} | " + " | ".join(_fmt(s["summary"], c[0]) for c in cols)
                         + f" | {s['unet_evaluations_per_image']} |")
        lines.append("")
    return "\n".join(lines)


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


COLORS = {"frontier": (40, 90, 200), "mask": (210, 40, 40), "gamma": (230, 140, 20), "early_stop": (40, 160, 60),
          "realcustom": (130, 40, 170), "described": (120, 120, 120), "layout": (0, 150, 150), "models": (0, 120, 60),
          "ground_truth": (0, 0, 0)}
LEGEND = {"frontier": "unmasked frontier", "mask": "AMG / mask ablations", "gamma": "gamma_scope",
          "early_stop": "early stop", "realcustom": "RealCustom", "described": "appearance in the prompt",
          "models": "further models (--model)",
          "layout": "mask on the named place (oracle)",
          "ground_truth": "rendered target (ceiling)"}


X_AXES = {"controllability": ("controllability", "controllability (background / position / other objects correct)"),
          "placed_any": ("placement", "subject placed where the prompt says (any shape)")}   # key: (title, axis)


def _layout(report: dict, width: int, height: int, x: str = "controllability") -> dict:
    """What :func:`plot` draws: the frame (L, R, T, B), the axis ranges, the pixel maps X / Y and the
    points ``[(name, label, colour, summary)]`` in drawing order (the frontier first, the ground truth last)."""
    pts = {s["name"]: s for s in report["settings"] if s["subjects"] == 1 and x in s["summary"]
           and "similarity" in s["summary"]}
    gt = report.get("ground_truth", {}).get("1", {})
    gt = gt if x in gt and "similarity" in gt else None
    front = [n for n in SETTING_NAMES if n in pts and (n == "t2i" or n.startswith("unmasked_"))]
    points = [(n, "t2i" if n == "t2i" else f"s={pts[n]['init_mask']}", COLORS["frontier"], pts[n]["summary"])
              for n in front]
    points += [(s["name"], s["name"], COLORS.get(s["group"], (0, 0, 0)), s["summary"]) for s in pts.values()
               if s["group"] != "frontier" and not s["same_as"]]
    points += [("ground_truth", "ground truth", COLORS["ground_truth"], gt)] if gt else []
    xs = [v for p in points for v in (p[3][x]["lo"], p[3][x]["hi"])]
    ys = [v for p in points for v in (p[3]["similarity"]["lo"], p[3]["similarity"]["hi"])]

    def span(v):
        if not v:
            return 0.0, 1.0
        lo, hi = max(0.0, math.floor(min(v) * 10) / 10), min(1.0, math.ceil(max(v) * 10) / 10)
        return (lo, hi) if hi > lo else (max(0.0, lo - 0.1), min(1.0, hi + 0.1))
    L, R, T, B = 70, width - 230, 62, height - 60
    (x0, x1), (y0, y1) = span(xs), span(ys)
    return dict(frame=(L, R, T, B), x=(x0, x1), y=(y0, y1), X=lambda v: L + (v - x0) / (x1 - x0) * (R - L),
                Y=lambda v: B - (v - y0) / (y1 - y0) * (B - T), points=points, frontier=len(front))


def plot_points(report: dict, width: int = 900, height: int = 640,
                x: str = "controllability") -> dict[str, tuple[tuple[float, float], tuple]]:
    """``{setting name (or "ground_truth"): ((x, y) pixel centre, colour)}`` of the points :func:`plot` draws."""
    lay = _layout(report, width, height, x)
    return {n: ((lay["X"](s[x]["mean"]), lay["Y"](s["similarity"]["mean"])), c)
            for n, _, c, s in lay["points"]}


def plot(report: dict, path: str | Path, width: int = 900, height: int = 640, x: str = "controllability") -> None:
    """Similarity (y) against controllability (x; or another score of :data:`X_AXES`) with 95% intervals:
    the unmasked frontier (t2i = s 0 and the four scales) as a line, the masked settings as labelled
    points, the rendered targets (ceiling)."""
    lay = _layout(report, width, height, x)
    L, R, T, B = lay["frame"]
    X, Y = lay["X"], lay["Y"]
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(15), _font(12)
    d.rectangle([L, T, R, B], outline="black")

    def ticks(lo, hi):
        step = next(s for s in (0.02, 0.05, 0.1, 0.2) if (hi - lo) / s <= 12)
        return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]
    for v in ticks(*lay["x"]):
        d.line([X(v), T, X(v), B], fill=(230, 230, 230))
        d.text((X(v), B + 8), f"{v:.2f}", fill="black", font=small, anchor="mt")
    for v in ticks(*lay["y"]):
        d.line([L, Y(v), R, Y(v)], fill=(230, 230, 230))
        d.text((L - 8, Y(v)), f"{v:.2f}", fill="black", font=small, anchor="rm")
    d.text(((L + R) / 2, height - 22), X_AXES[x][1], fill="black", font=font, anchor="mm")
    d.text((12, T - 24), "similarity to the reference (appearance)", fill="black", font=font)
    d.text(((L + R) / 2, 14), f"ShapeWorld customization: similarity vs {X_AXES[x][0]} (95% intervals)",
           fill="black", font=font, anchor="mm")
    points = lay["points"]
    if lay["frontier"] > 1:
        d.line([(X(s[x]["mean"]), Y(s["similarity"]["mean"])) for *_, s in points[:lay["frontier"]]],
               fill=COLORS["frontier"], width=2)
    for _, label, color, s in points:
        cx, cy = s[x], s["similarity"]
        px, py, r = X(cx["mean"]), Y(cy["mean"]), 5
        d.line([X(cx["lo"]), py, X(cx["hi"]), py], fill=color)
        d.line([px, Y(cy["lo"]), px, Y(cy["hi"])], fill=color)
        d.ellipse([px - r, py - r, px + r, py + r], fill=color)
        right = px > R - 90   # labels near the right edge go to the left of the point
        d.text((px + (-7 if right else 7), py - 7), label, fill=color, font=small, anchor="rs" if right else "ls")
    ly = T
    for g, c in COLORS.items():
        d.rectangle([R + 20, ly + 3, R + 32, ly + 15], fill=c)
        d.text((R + 40, ly), LEGEND[g], fill="black", font=small)
        ly += 22
    img.save(path)


def sample_grid(extra: dict, report: dict, path: str | Path, rows: int = 4, tile: int = 96, pad: int = 4) -> None:
    """Rows: the first cases (first seed); columns: the reference(s), then every setting sampled.
    ``extra["index"][setting][case name]``: the index of the case's first-seed image in
    ``extra["images"][setting]``. Tiles are upsampled by an integer factor (about ``tile`` pixels)."""
    size = report["image_size"]
    k = max(1, round(tile / size))
    t = size * k
    font = _font(11)
    blocks = []
    for pool, n_ref in ((extra["single"], 1), (extra["two"], 2)):
        names = [s["name"] for s in report["settings"] if s["subjects"] == n_ref and not s["same_as"]]
        if not pool or not names:
            continue
        tiles = []
        for case in pool[:rows]:
            tiles += list(case.reference_images(size))
            tiles += [extra["images"][name][extra["index"][name][case.name]] for name in names]
        cols = (["ref"] if n_ref == 1 else ["ref 1", "ref 2"]) + names
        up = np.repeat(np.repeat(np.stack(tiles).astype(np.float32) / 255.0, k, 1), k, 2)
        body = Image.fromarray(to_uint8(grid(up, cols=len(cols), pad=pad)))
        block = Image.new("RGB", (body.width, body.height + 20), "white")
        block.paste(body, (0, 20))
        d = ImageDraw.Draw(block)
        for j, name in enumerate(cols):
            d.text((pad + j * (t + pad) + t / 2, 12), name[:16], fill="black", font=font, anchor="mm")
        blocks.append(block)
    if not blocks:
        return
    out = Image.new("RGB", (max(b.width for b in blocks), sum(b.height for b in blocks) + 8 * len(blocks)), "white")
    y = 0
    for b in blocks:
        out.paste(b, (0, y))
        y += b.height + 8
    out.save(path)


def write_report(report: dict, extra: dict, out: str | Path) -> dict[str, Path]:
    """Writes ``results.json``, ``results.md``, ``frontier.png`` (similarity against controllability),
    ``frontier_placed.png`` (against ``placed_any``) and ``samples.png`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out / "results.json", markdown=out / "results.md", plot=out / "frontier.png",
                 plot_placed=out / "frontier_placed.png", grid=out / "samples.png")
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    paths["markdown"].write_text(markdown(report))
    plot(report, paths["plot"])
    plot(report, paths["plot_placed"], x="placed_any")
    sample_grid(extra, report, paths["grid"])
    return paths

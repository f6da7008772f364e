"""The benchmark's report: ``results.json``, a markdown table per settings group (:func:`markdown`),
the similarity / controllability plot (:func:`plot`) and the sample grid (:func:`sample_grid`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from customjax.benchmark.settings import GROUPS, SETTING_NAMES


def _fmt(summary: dict, key: str) -> str:
    v = summary.get(key)
    if v is None:
        return "-"
    return f"{v['mean']:.3f} ± {(v['hi'] - v['lo']) / 2:.3f}"


def markdown(report: dict) -> str:
    cols = (("controllability", "Controllability"), ("background_correct", "Background"),
            ("position_correct", "Position"), ("others_correct", "Other objects"), ("similarity", "Similarity"),
            ("clip_t", "CLIP-T"), ("clip_i", "CLIP-I"), ("mask_mean", "Mask cover"))
    lines = [f"# ShapeWorld customization benchmark", "",
             f"Device {report['device']['kind']} ({report['device']['platform']}), commit "
             f"{(report.get('commit') or '?')[:12]}{' (dirty)' if report.get('dirty') else ''}; "
             f"{report['steps']} {report['sampler']} steps, {report['image_size']} px; seeds {report['seeds']}; "
             f"{sum(1 for c in report['cases'] if len(c['words']) == 1)} single-subject and "
             f"{sum(1 for c in report['cases'] if len(c['words']) == 2)} two-subject held-out cases; "
             f"checkpoint `{report.get('checkpoint')}`.", "",
             f"Mean ± half-width of the 95% interval over cases x seeds. {report['definition']}.", ""]
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
        if gt and g in ("frontier", "two_subject"):
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


def plot(report: dict, path: str | Path, width: int = 900, height: int = 640) -> None:
    """Similarity (y) against controllability (x) with 95% intervals: the unmasked frontier (t2i = s 0
    and the four scales) as a line, the masked settings as labelled points."""
    pts = {s["name"]: s for s in report["settings"] if s["subjects"] == 1 and "controllability" in s["summary"]
           and "similarity" in s["summary"]}
    img = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(img)
    font, small = _font(15), _font(12)
    L, R, T, B = 70, width - 230, 62, height - 60
    gt = report.get("ground_truth", {}).get("1", {})
    gt = gt if "controllability" in gt and "similarity" in gt else None
    shown = list(pts.values()) + ([dict(summary=gt)] if gt else [])
    xs = [v for s in shown for v in (s["summary"]["controllability"]["lo"], s["summary"]["controllability"]["hi"])]
    ys = [v for s in shown for v in (s["summary"]["similarity"]["lo"], s["summary"]["similarity"]["hi"])]

    def span(v):
        if not v:
            return 0.0, 1.0
        lo, hi = max(0.0, math.floor(min(v) * 10) / 10), min(1.0, math.ceil(max(v) * 10) / 10)
        return (lo, hi) if hi > lo else (max(0.0, lo - 0.1), min(1.0, hi + 0.1))
    (x0, x1), (y0, y1) = span(xs), span(ys)
    X = lambda v: L + (v - x0) / (x1 - x0) * (R - L)
    Y = lambda v: B - (v - y0) / (y1 - y0) * (B - T)
    d.rectangle([L, T, R, B], outline="black")
    def ticks(lo, hi):
        step = next(s for s in (0.02, 0.05, 0.1, 0.2) if (hi - lo) / s <= 12)
        return [k * step for k in range(math.ceil(lo / step - 1e-9), math.floor(hi / step + 1e-9) + 1)]
    for horiz, vals in ((False, ticks(x0, x1)), (True, ticks(y0, y1))):
        for v in vals:
            if horiz:
                d.line([L, Y(v), R, Y(v)], fill=(230, 230, 230))
                d.text((L - 8, Y(v)), f"{v:.2f}", fill="black", font=small, anchor="rm")
            else:
                d.line([X(v), T, X(v), B], fill=(230, 230, 230))
                d.text((X(v), B + 8), f"{v:.2f}", fill="black", font=small, anchor="mt")
    d.text(((L + R) / 2, height - 22), "controllability (background / position / other objects correct)",
           fill="black", font=font, anchor="mm")
    d.text((12, T - 24), "similarity to the reference (appearance)", fill="black", font=font)
    d.text(((L + R) / 2, 14), "ShapeWorld customization: similarity vs controllability (95% intervals)",
           fill="black", font=font, anchor="mm")
    front = [n for n in SETTING_NAMES if n in pts and (n == "t2i" or n.startswith("unmasked_"))]
    colors = {"frontier": (40, 90, 200), "mask": (210, 40, 40), "gamma": (230, 140, 20), "early_stop": (40, 160, 60),
              "realcustom": (130, 40, 170), "ground_truth": (0, 0, 0)}

    def point(s, color, label):
        cx, cy = s["summary"]["controllability"], s["summary"]["similarity"]
        d.line([X(cx["lo"]), Y(cy["mean"]), X(cx["hi"]), Y(cy["mean"])], fill=color)
        d.line([X(cx["mean"]), Y(cy["lo"]), X(cx["mean"]), Y(cy["hi"])], fill=color)
        r = 5
        d.ellipse([X(cx["mean"]) - r, Y(cy["mean"]) - r, X(cx["mean"]) + r, Y(cy["mean"]) + r], fill=color)
        right = X(cx["mean"]) > R - 90   # labels near the right edge go to the left of the point
        d.text((X(cx["mean"]) + (-7 if right else 7), Y(cy["mean"]) - 7), label, fill=color, font=small,
               anchor="rs" if right else "ls")

    if len(front) > 1:
        d.line([(X(pts[n]["summary"]["controllability"]["mean"]), Y(pts[n]["summary"]["similarity"]["mean"]))
                for n in front], fill=colors["frontier"], width=2)
    for n in front:
        point(pts[n], colors["frontier"], "t2i" if n == "t2i" else f"s={pts[n]['init_mask']}")
    for s in pts.values():
        if s["group"] != "frontier" and not s["same_as"]:
            point(s, colors.get(s["group"], (0, 0, 0)), s["name"])
    if gt:
        point(dict(summary=gt), (0, 0, 0), "ground truth")
    ly = T
    for g, c in colors.items():
        d.rectangle([R + 20, ly + 3, R + 32, ly + 15], fill=c)
        d.text((R + 40, ly), {"frontier": "unmasked frontier", "mask": "AMG / mask ablations", "gamma": "gamma_scope",
                              "early_stop": "early stop", "realcustom": "RealCustom",
                              "ground_truth": "rendered target (ceiling)"}[g], fill="black", font=small)
        ly += 22
    img.save(path)


def sample_grid(extra: dict, report: dict, path: str | Path, rows: int = 4, tile: int = 96) -> None:
    """Rows: the first cases (first seed); columns: the reference(s), then every setting sampled."""
    font = _font(11)
    blocks = []
    for pool, n_ref in ((extra["single"], 1), (extra["two"], 2)):
        names = [s["name"] for s in report["settings"] if s["subjects"] == n_ref and not s["same_as"]]
        if not pool or not names:
            continue
        cases = pool[:rows]
        header = ["ref"] if n_ref == 1 else ["ref 1", "ref 2"]
        cols = header + names
        W, H = len(cols) * (tile + 4) + 4, len(cases) * (tile + 4) + 24
        block = Image.new("RGB", (W, H), "white")
        d = ImageDraw.Draw(block)
        for j, name in enumerate(cols):
            d.text((4 + j * (tile + 4) + tile / 2, 10), name[:16], fill="black", font=font, anchor="mm")
        for i, case in enumerate(cases):
            size = report["image_size"]
            tiles = list(case.reference_images(size))
            k = i * len(extra["seeds"])      # images are in (case, seed) order
            tiles += [extra["images"][name][k] for name in names]
            for j, t in enumerate(tiles):
                block.paste(Image.fromarray(t).resize((tile, tile), Image.NEAREST),
                            (4 + j * (tile + 4), 20 + i * (tile + 4)))
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
    """Writes ``results.json``, ``results.md``, ``frontier.png`` and ``samples.png`` to ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = dict(json=out / "results.json", markdown=out / "results.md", plot=out / "frontier.png",
                 grid=out / "samples.png")
    paths["json"].write_text(json.dumps(report, indent=1, default=str))
    paths["markdown"].write_text(markdown(report))
    plot(report, paths["plot"])
    sample_grid(extra, report, paths["grid"])
    return paths

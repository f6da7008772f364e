"""The evaluation's outputs: per-method summaries, the markdown tables, the similarity-controllability
frontier plot (every method a point with its 95% intervals) and the sample sheet."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from customjax.evaluation.stats import bootstrap, fmt


def summarise(rows: Sequence[dict], metrics: Sequence[str], group: str = "group") -> dict:
    """{metric: bootstrap over ``rows[group]``} for the metrics the rows carry."""
    out = {}
    for m in metrics:
        vals = [r.get(m) for r in rows]
        if any(v is not None for v in vals):
            out[m] = bootstrap(vals, [r[group] for r in rows])
    return out


def ratio(a: Sequence[float], b: Sequence[float], groups: Sequence, n: int = 2000, seed: int = 0) -> dict | None:
    """mean(a) / mean(b) over the same images with a 95% interval from resampling groups (both together)."""
    a, b, g = np.asarray(a, float), np.asarray(b, float), np.asarray(list(groups))
    if not len(a) or b.mean() <= 0:
        return None
    ids = list(dict.fromkeys(g.tolist()))
    sa = np.array([a[g == i].sum() for i in ids])
    sb = np.array([b[g == i].sum() for i in ids])
    rng = np.random.default_rng(seed)
    pick = rng.integers(len(ids), size=(n, len(ids)))
    boots = sa[pick].sum(1) / np.maximum(sb[pick].sum(1), 1e-12)
    return dict(mean=float(a.mean() / b.mean()), lo=float(np.percentile(boots, 2.5)), hi=float(np.percentile(boots, 97.5)),
                n=int(len(a)), groups=len(ids))


def table(methods: dict, kind: str, columns: Sequence[tuple[str, str]], extra: Sequence[tuple[str, str]] = ()) -> list[str]:
    """Markdown lines: one row per method with a summary for ``kind``; ``columns``: (metric, header);
    ``extra``: (field of the method's record, header), printed as is."""
    head = ["Method"] + [h for _, h in columns] + [h for _, h in extra]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods.values():
        s = m.get("summary", {}).get(kind)
        if s is None and not m.get("unsupported", {}).get(kind):
            continue
        cells = ["n/a"] * len(columns) if s is None else [fmt(s.get(k)) for k, _ in columns]
        lines.append("| " + " | ".join([m["label"], *cells, *(_cell(m.get(f)) for f, _ in extra)]) + " |")
    return lines


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"
    return str(v)


# ---------------------------------------------------------------------------------------------------------
# The frontier plot.


def frontier(points: Sequence[dict], path: str | Path, xlabel: str, ylabel: str, title: str,
             hlines: Sequence[tuple[float, str]] = (), width: int = 1100, height: int = 700) -> None:
    """Each point ``{"label", "x": summary, "y": summary, "kind": "method" | "reference"}`` at its means
    with 95% interval whiskers; ``hlines``: (y, label) reference levels (dashed)."""
    from PIL import Image, ImageDraw

    from customjax.images import _font

    font, small = _font(16), _font(13)
    left, right, top, bottom = 80, 330, 70, 60
    xs = [v for p in points for v in (p["x"]["lo"], p["x"]["hi"])]
    ys = [v for p in points for v in (p["y"]["lo"], p["y"]["hi"])] + [h for h, _ in hlines]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(0.0, min(ys)), max(ys)
    padx, pady = 0.05 * (x1 - x0 or 1), 0.05 * (y1 - y0 or 1)
    x0, x1, y0, y1 = x0 - padx, x1 + padx, y0 - pady, y1 + pady
    W, H = width - left - right, height - top - bottom
    X = lambda v: left + (v - x0) / (x1 - x0) * W          # noqa: E731
    Y = lambda v: top + (1 - (v - y0) / (y1 - y0)) * H      # noqa: E731
    page = Image.new("RGB", (width, height), "white")
    d = ImageDraw.Draw(page)
    d.text((left, 12), title, fill="black", font=font)
    d.rectangle([left, top, left + W, top + H], outline="black")
    for k in range(6):
        vx, vy = x0 + (x1 - x0) * k / 5, y0 + (y1 - y0) * k / 5
        d.line([X(vx), top + H, X(vx), top + H + 5], fill="black")
        d.text((X(vx) - 14, top + H + 8), f"{vx:.2f}", fill="black", font=small)
        d.line([left - 5, Y(vy), left, Y(vy)], fill="black")
        d.text((left - 48, Y(vy) - 7), f"{vy:.2f}", fill="black", font=small)
    d.text((left + W // 2 - 80, height - 28), xlabel, fill="black", font=font)
    d.text((8, top - 24), ylabel, fill="black", font=font)
    for h, label in hlines:
        for xx in range(int(X(x0)), int(X(x1)), 12):
            d.line([xx, Y(h), xx + 6, Y(h)], fill="gray")
        d.text((left + W - 8 - small.getlength(label), Y(h) - 16), label, fill="gray", font=small)
    colours = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
               "#7f7f7f", "#393b79", "#637939"]
    for i, p in enumerate(points):
        c = "black" if p.get("kind") == "reference" else colours[i % len(colours)]
        cx, cy = X(p["x"]["mean"]), Y(p["y"]["mean"])
        d.line([X(p["x"]["lo"]), cy, X(p["x"]["hi"]), cy], fill=c, width=2)
        d.line([cx, Y(p["y"]["lo"]), cx, Y(p["y"]["hi"])], fill=c, width=2)
        r = 6
        (d.rectangle if p.get("kind") == "reference" else d.ellipse)([cx - r, cy - r, cx + r, cy + r], fill=c)
        d.text((cx + 8, cy - 18), str(i + 1), fill=c, font=small)
        ly = top + 4 + 20 * i
        d.ellipse([left + W + 16, ly + 3, left + W + 26, ly + 13], fill=c)
        d.text((left + W + 32, ly), f"{i + 1}. {p['label']}", fill=c, font=small)
    page.save(path)


def sample_sheet(rows: list[dict], path: str | Path, min_size: int = 128) -> None:
    """:func:`customjax.images.sheet` of ``rows`` ({"title", "tiles": [(label, uint8 image)]})."""
    from customjax.images import save_png, sheet

    save_png(sheet(rows, min_size=min_size, font_size=13), path)

"""Small synthetic datasets of both kinds, for tests and the ``tiny`` training config.

Text-image pairs: a coloured shape on a coloured background, captioned "a red circle on a blue
background". Multiview objects: one shape and colour on one background, in several frames that
differ in position, size and rotation, with per-frame subject masks. Everything is written through
the converters' :func:`~customjax.data.convert.write_shards` (or as the converters' input layouts).
``inject`` adds deliberately bad images (see :data:`BAD_IMAGES`) at the start of the data.

    python -m customjax.data.synthetic OUT_DIR --num_text_image 64 --num_multiview 16 --size 64
"""

from __future__ import annotations

import io
import json
import pathlib
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

from customjax.data.convert import write_shards
from customjax.data.records import Example

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
    "purple": (140, 50, 170), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (20, 20, 20),
}
SHAPES = {"circle": 0, "triangle": 3, "square": 4, "pentagon": 5, "hexagon": 6}  # polygon sides (0: circle)
# Bad image kind -> the loader's skip reason (None: converted to RGB and used).
BAD_IMAGES = {"corrupt": "undecodable", "truncated": "truncated", "tiny": "too_small", "grayscale": None,
              "cmyk": None, "palette": None, "rgba": None}
TINY_SIDE = 8


def draw(shape: str, color: str, background: str, size: int, center, radius: float, angle: float):
    """(RGB image, L mask) of one shape."""
    im = Image.new("RGB", (size, size), COLORS[background])
    mask = Image.new("L", (size, size), 0)
    for target, fill in ((ImageDraw.Draw(im), COLORS[color]), (ImageDraw.Draw(mask), 255)):
        if SHAPES[shape] == 0:
            target.ellipse([center[0] - radius, center[1] - radius, center[0] + radius, center[1] + radius], fill=fill)
        else:
            target.regular_polygon((center[0], center[1], radius), SHAPES[shape], rotation=angle, fill=fill)
    return im, mask


def caption(color: str, shape: str, background: str) -> str:
    article = "an" if color[0] in "aeiou" else "a"
    return f"{article} {color} {shape} on a {background} background"


def encode(im: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _pick(rng, names, exclude=()):
    return str(rng.choice([n for n in names if n not in exclude]))


def _pose(rng, size):
    radius = rng.uniform(0.15, 0.35) * size
    center = rng.uniform(radius, size - radius, size=2)
    return center, radius, float(rng.uniform(0, 360))


def text_image(rng: np.random.Generator, size: int):
    """(image, caption) of a random shape."""
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    background = _pick(rng, COLORS, exclude=(color,))
    im, _ = draw(shape, color, background, size, *_pose(rng, size))
    return im, caption(color, shape, background)


def multiview_object(rng: np.random.Generator, size: int, num_frames: int):
    """(frames, masks, caption) of one shape seen in ``num_frames`` poses."""
    shape, color = _pick(rng, SHAPES), _pick(rng, COLORS)
    background = _pick(rng, COLORS, exclude=(color,))
    views = [draw(shape, color, background, size, *_pose(rng, size)) for _ in range(num_frames)]
    return [v[0] for v in views], [v[1] for v in views], caption(color, shape, background)


def bad_image(kind: str, rng: np.random.Generator, size: int) -> bytes:
    """Encoded bytes of a deliberately awkward image (a key of :data:`BAD_IMAGES`)."""
    im, _ = text_image(rng, size)
    if kind == "corrupt":
        return b"not an image" + rng.bytes(64)
    if kind == "truncated":
        data = encode(im, "JPEG")
        return data[: len(data) // 2]
    if kind == "tiny":
        return encode(im.resize((TINY_SIDE, TINY_SIDE)))
    if kind == "grayscale":
        return encode(im.convert("L"), "JPEG")
    if kind == "cmyk":
        return encode(im.convert("CMYK"), "JPEG")
    if kind == "palette":
        return encode(im.convert("P", palette=Image.Palette.ADAPTIVE, colors=16))
    if kind == "rgba":
        rgba = im.convert("RGBA")
        rgba.putalpha(Image.linear_gradient("L").resize(im.size))
        return encode(rgba)
    raise ValueError(f"unknown bad image kind {kind!r}; choose from {sorted(BAD_IMAGES)}")


def text_image_examples(n: int, size: int = 48, seed: int = 0, inject: Sequence[str] = (), fmt: str = "PNG"):
    """Injected bad examples first (in ``inject`` order), then ``n`` good ones."""
    rng = np.random.default_rng(seed)
    for i, kind in enumerate(inject):
        yield Example(kind="text_image", caption=f"a {kind} image", frames=(bad_image(kind, rng, size),),
                      names=(kind,), source=f"synthetic/bad{i}-{kind}")
    for i in range(n):
        im, text = text_image(rng, size)
        yield Example(kind="text_image", caption=text, frames=(encode(im, fmt),), names=(f"{i:06d}",),
                      source=f"synthetic/{i:06d}")


def multiview_examples(n: int, num_frames: int = 4, size: int = 48, seed: int = 0, inject: Sequence[str] = ()):
    """Objects whose frames are all of an injected bad kind first, then ``n`` good objects with masks."""
    rng = np.random.default_rng(seed + 1)
    for i, kind in enumerate(inject):
        frames = tuple(bad_image(kind, rng, size) for _ in range(num_frames))
        yield Example(kind="multiview", caption=f"a {kind} object", frames=frames, object_id=f"bad{i}-{kind}",
                      source=f"synthetic/bad{i}-{kind}")
    for i in range(n):
        frames, masks, text = multiview_object(rng, size, num_frames)
        yield Example(kind="multiview", caption=text, frames=tuple(encode(f, "JPEG") for f in frames),
                      names=tuple(f"{j:03d}" for j in range(num_frames)), masks=tuple(encode(m) for m in masks),
                      object_id=f"obj{i:05d}", source=f"synthetic/obj{i:05d}")


def write_text_image_shards(out_dir, n: int, *, size: int = 48, num_shards: int = 1, seed: int = 0,
                            inject: Sequence[str] = (), name: str = "train", progress: bool = False) -> dict:
    return write_shards(text_image_examples(n, size, seed, inject), out_dir, name, num_shards,
                        total=n + len(inject), kind="text_image", source="synthetic", progress=progress)


def write_multiview_shards(out_dir, n: int, *, num_frames: int = 4, size: int = 48, num_shards: int = 1,
                           seed: int = 0, inject: Sequence[str] = (), name: str = "train",
                           progress: bool = False) -> dict:
    return write_shards(multiview_examples(n, num_frames, size, seed, inject), out_dir, name, num_shards,
                        total=n + len(inject), kind="multiview", source="synthetic", progress=progress)


def write_image_folder(root, n: int, *, size: int = 48, seed: int = 0, per_folder: int = 4) -> list[str]:
    """img2dataset layout: ``00000/000000001.jpg`` + ``.txt``; returns the captions in file order."""
    rng, captions = np.random.default_rng(seed), []
    for i in range(n):
        im, text = text_image(rng, size)
        folder = pathlib.Path(root) / f"{i // per_folder:05d}"
        folder.mkdir(parents=True, exist_ok=True)
        im.save(folder / f"{i:09d}.jpg", quality=90)
        (folder / f"{i:09d}.txt").write_text(text)
        captions.append(text)
    return captions


def write_jsonl(root, n: int, *, size: int = 48, seed: int = 0) -> pathlib.Path:
    """``root/images/*.png`` and ``root/manifest.jsonl`` with relative paths."""
    rng, root = np.random.default_rng(seed), pathlib.Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(n):
        im, text = text_image(rng, size)
        im.save(root / "images" / f"{i:04d}.png")
        lines.append(json.dumps({"image": f"images/{i:04d}.png", "caption": text}))
    (root / "manifest.jsonl").write_text("\n".join(lines) + "\n")
    return root / "manifest.jsonl"


def write_multiview_folder(root, n: int, *, num_frames: int = 3, size: int = 48, seed: int = 0,
                           masks: bool = True) -> list[str]:
    """``root/<object_id>/<frame>.jpg``, ``caption.txt``, ``masks/<frame>.png``; returns the captions."""
    rng, captions = np.random.default_rng(seed), []
    for i in range(n):
        frames, frame_masks, text = multiview_object(rng, size, num_frames)
        obj = pathlib.Path(root) / f"object{i:04d}"
        (obj / "masks").mkdir(parents=True, exist_ok=True)
        for j, (f, m) in enumerate(zip(frames, frame_masks)):
            f.save(obj / f"view{j:02d}.jpg", quality=90)
            if masks:
                m.save(obj / "masks" / f"view{j:02d}.png")
        (obj / "caption.txt").write_text(text)
        captions.append(text)
    return captions


def make_tiny_dataset(out_dir, *, num_text_image: int = 64, num_multiview: int = 16, num_frames: int = 4,
                      size: int = 64, num_shards: int = 2, seed: int = 0) -> dict[str, str]:
    """Both kinds under ``out_dir/text_image`` and ``out_dir/multiview``; returns ``make_loader`` sources."""
    out = pathlib.Path(out_dir)
    write_text_image_shards(out / "text_image", num_text_image, size=size, num_shards=num_shards, seed=seed)
    write_multiview_shards(out / "multiview", num_multiview, num_frames=num_frames, size=size,
                           num_shards=num_shards, seed=seed)
    return {"text_image": str(out / "text_image"), "multiview": str(out / "multiview")}


PROG = "customjax.data.synthetic"
PARSE = dict(usage=f"python -m {PROG} OUT_DIR [flags]", doc=__doc__, positionals=("OUT_DIR",))


def define_flags(flag_values=None) -> None:
    """The command's flags (defined on use, so that importing this module defines none), on absl's
    ``flags.FLAGS`` or ``flag_values``. Positional argument: OUT_DIR."""
    from absl import flags

    fv = dict(flag_values=flags.FLAGS if flag_values is None else flag_values)
    flags.DEFINE_integer("num_text_image", 64, "text-image examples (OUT_DIR/text_image)", lower_bound=0, **fv)
    flags.DEFINE_integer("num_multiview", 16, "multiview objects (OUT_DIR/multiview)", lower_bound=0, **fv)
    flags.DEFINE_integer("num_frames", 4, "frames per multiview object", lower_bound=1, **fv)
    flags.DEFINE_integer("size", 64, "image side in pixels", lower_bound=1, **fv)
    flags.DEFINE_integer("num_shards", 2, "ArrayRecord shards per kind", lower_bound=1, **fv)
    flags.DEFINE_integer("seed", 0, "random seed", **fv)


def main(argv, flag_values=None) -> int:
    """The command: ``argv`` is what absl's ``app.run`` passes (the program, OUT_DIR), the flags
    parsed into ``flag_values`` (default ``flags.FLAGS``). In this process: :func:`command`."""
    from absl import flags

    f = flags.FLAGS if flag_values is None else flag_values
    _, out = argv
    print(json.dumps(make_tiny_dataset(out, num_text_image=f.num_text_image, num_multiview=f.num_multiview,
                                       num_frames=f.num_frames, size=f.size, num_shards=f.num_shards,
                                       seed=f.seed), indent=2))
    return 0


def command(args) -> int:
    """``python -m customjax.data.synthetic *args`` in this process (a fresh set of flags each
    call); returns the exit code."""
    from customjax.cli import call

    return call(PROG, define_flags, main, args, **PARSE)


if __name__ == "__main__":
    from customjax.cli import run

    run(PROG, define_flags, main, **PARSE)

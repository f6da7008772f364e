"""Converters from image folders / JSONL manifests / multiview folders to ArrayRecord shards.

Inputs:

* ``folder``: the img2dataset layout, ``<any/nested/dirs>/<key>.jpg`` next to ``<key>.txt``
  (the caption); every image file with a known extension is one text-image example.
* ``jsonl``: one JSON object per line, ``{"image": path, "caption": str}``; relative paths are
  relative to the manifest's folder.
* ``multiview``: ``<root>/<object_id>/<frame>.jpg`` (all frames of one object), optional
  ``<root>/<object_id>/caption.txt`` and ``<root>/<object_id>/masks/<frame>.png``; one record per
  object holding all its frames.

Image bytes are stored as they are (no re-encoding). Examples that cannot be used are skipped
and counted by reason; the counts are printed at the end and written to ``<out>/<name>.stats.json``
next to the shards. Command line::

    python -m customjax.data.convert folder    SRC_DIR  --out OUT --num_shards 8
    python -m customjax.data.convert jsonl     SRC.jsonl --out OUT
    python -m customjax.data.convert multiview SRC_DIR  --out OUT --min_frames 2
"""

from __future__ import annotations

import collections
import dataclasses
import io
import json
import os
import pathlib
import sys
from typing import Iterable, Iterator

from customjax.data.records import Example, ShardedWriter

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
VERIFY_LEVELS = ("none", "header", "decode")
_MAX_EXAMPLES_PER_REASON = 10


@dataclasses.dataclass(frozen=True)
class Skip:
    """An input that was not written, with the reason (a short slug) and the file at fault."""

    reason: str
    where: str
    detail: str = ""


def check_image(data: bytes, level: str = "header") -> str | None:
    """``None`` if ``data`` passes the check, else a skip reason: ``"header"`` opens the image and
    runs PIL's ``verify`` (corrupt headers, PNG checksums); ``"decode"`` decodes it as training does
    (:func:`~customjax.data.images.open_rgb`: also catches truncated files; slower)."""
    from customjax.data import images

    if level == "none":
        return None
    if level == "decode":
        try:
            images.open_rgb(data, "")
        except images.ImageError as e:
            return e.reason
        return None
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for bad files
        return images.failure_reason(e)
    return None


def _read_caption(path: pathlib.Path) -> str:
    return path.read_text(encoding="utf-8").strip()


def _is_image(path: pathlib.Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTS and not path.name.startswith(".")


def _image_example(image: pathlib.Path, caption: str | None, allow_empty_caption: bool, verify: str,
                   where: str | None = None) -> Example | Skip:
    where = where or str(image)
    if caption is None and not allow_empty_caption:
        return Skip("missing_caption", where)
    try:
        data = image.read_bytes()
    except OSError as e:
        return Skip("unreadable", where, str(e))
    reason = check_image(data, verify)
    if reason:
        return Skip(reason, where)
    return Example(kind="text_image", caption=caption or "", frames=(data,), names=(image.stem,), source=str(image))


def image_folder_examples(root, *, allow_empty_caption=False, verify="header") -> tuple[int, Iterator]:
    """(count, examples) of an img2dataset-style folder: ``key.jpg`` + ``key.txt``, nested ok."""
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    images = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p))

    def gen():
        for image in images:
            txt = image.with_suffix(".txt")
            try:
                caption = _read_caption(txt) if txt.exists() else None
            except (OSError, UnicodeDecodeError) as e:
                yield Skip("bad_caption", str(txt), str(e))
                continue
            yield _image_example(image, caption, allow_empty_caption, verify)

    return len(images), gen()


def jsonl_examples(manifest, *, allow_empty_caption=False, verify="header") -> tuple[int, Iterator]:
    """(count, examples) of a JSONL manifest of ``{"image": path, "caption": str}`` lines."""
    manifest = pathlib.Path(manifest)
    lines = manifest.read_text(encoding="utf-8").splitlines()
    base = manifest.parent

    def gen():
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            where = f"{manifest}:{n}"
            try:
                entry = json.loads(line)
                image = pathlib.Path(entry["image"])
                caption = entry.get("caption")
                if caption is not None and not isinstance(caption, str):
                    raise TypeError(f"caption is {type(caption).__name__}")
            except (ValueError, KeyError, TypeError) as e:
                yield Skip("bad_manifest_line", where, f"{type(e).__name__}: {e}")
                continue
            image = image if image.is_absolute() else base / image
            if not image.exists():
                yield Skip("missing_file", where, str(image))
                continue
            yield _image_example(image, caption, allow_empty_caption, verify, where=f"{where} ({image})")

    return sum(1 for line in lines if line.strip()), gen()


def alpha_mask(data: bytes) -> bytes | None:
    """The alpha channel of an image with one that is not fully opaque, as a single-channel PNG (the
    subject mask of a cut-out view); None otherwise."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if "A" not in im.getbands() and not (im.mode == "P" and "transparency" in im.info):
            return None
        alpha = im.convert("RGBA").getchannel("A")
    if alpha.getextrema()[0] == 255:
        return None
    buf = io.BytesIO()
    alpha.save(buf, format="PNG")
    return buf.getvalue()


class MissingMaskError(ValueError):
    """``require_masks``: a view has neither a mask file nor an alpha channel."""


def multiview_examples(root, *, min_frames=2, allow_empty_caption=False, verify="header",
                       frame_skips: collections.Counter | None = None, require_masks: bool = False
                       ) -> tuple[int, Iterator]:
    """(count, examples) of a multiview folder: one record per ``<object_id>/`` with all frames.

    Each view's subject mask is ``<object_id>/masks/<frame>.png``, or else the frame's alpha channel
    (a cut-out view). With ``require_masks`` (methods that read the masks, CustomContrast), a view with
    neither raises :class:`MissingMaskError` naming it. Unusable frames are dropped from their object
    (counted by reason in ``frame_skips``); an object left with fewer than ``min_frames`` frames is
    skipped as ``too_few_frames``.
    """
    root = pathlib.Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"multiview folder {root} does not exist")
    objects = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    frame_skips = collections.Counter() if frame_skips is None else frame_skips
    if require_masks:        # before anything is written: every view has a mask file or an alpha channel
        for obj in objects:
            for f in sorted(p for p in obj.iterdir() if p.is_file() and _is_image(p)):
                if not (obj / "masks" / f"{f.stem}.png").exists() and alpha_mask(f.read_bytes()) is None:
                    raise MissingMaskError(f"{f}: no subject mask ({obj / 'masks' / (f.stem + '.png')} is missing "
                                           "and the image has no alpha channel); --require_masks needs one per view")

    def gen():
        for obj in objects:
            txt = obj / "caption.txt"
            try:
                caption = _read_caption(txt) if txt.exists() else None
            except (OSError, UnicodeDecodeError) as e:
                yield Skip("bad_caption", str(txt), str(e))
                continue
            if caption is None and not allow_empty_caption:
                yield Skip("missing_caption", str(obj))
                continue
            frames, names, masks = [], [], []
            for f in sorted(p for p in obj.iterdir() if p.is_file() and _is_image(p)):
                try:
                    data = f.read_bytes()
                except OSError:
                    frame_skips["unreadable"] += 1
                    continue
                reason = check_image(data, verify)
                if reason:
                    frame_skips[reason] += 1
                    continue
                mask = None
                mask_path = obj / "masks" / f"{f.stem}.png"
                if mask_path.exists():
                    mask = mask_path.read_bytes()
                    if check_image(mask, verify):
                        frame_skips["bad_mask"] += 1
                        mask = None
                else:
                    mask = alpha_mask(data)
                if mask is None and require_masks:          # its mask file is unreadable: the view goes
                    continue
                frames.append(data)
                names.append(f.stem)
                masks.append(mask)
            if len(frames) < max(min_frames, 1):
                yield Skip("too_few_frames", str(obj), f"{len(frames)} usable frames")
                continue
            yield Example(kind="multiview", caption=caption or "", frames=tuple(frames), names=tuple(names),
                          masks=tuple(masks) if any(m is not None for m in masks) else None,
                          object_id=obj.name, source=str(obj))

    return len(objects), gen()


def write_shards(examples: Iterable[Example | Skip], out_dir, name: str = "train", num_shards: int = 1, *,
                 total: int | None = None, kind: str = "", source: str = "", progress: bool = True,
                 extra_stats: dict | None = None) -> dict:
    """Writes the examples into ``num_shards`` shards and ``<out_dir>/<name>.stats.json``; returns the stats
    (``written``, ``skipped`` by reason, ``skipped_total``, a few ``skipped_examples`` per reason)."""
    from tqdm import tqdm

    skipped = collections.Counter()
    skipped_examples = collections.defaultdict(list)
    with ShardedWriter(out_dir, name, num_shards) as writer:
        for item in tqdm(examples, total=total, desc=f"{name} -> {out_dir}", unit=" ex", disable=not progress,
                         file=sys.stderr):
            if isinstance(item, Skip):
                skipped[item.reason] += 1
                if len(skipped_examples[item.reason]) < _MAX_EXAMPLES_PER_REASON:
                    skipped_examples[item.reason].append(item.where + (f": {item.detail}" if item.detail else ""))
            else:
                writer.write(item)
        paths = writer.paths
        written = writer.count
    stats = {
        "name": name, "kind": kind, "source": source, "num_shards": num_shards,
        "shards": [os.path.basename(p) for p in paths],
        "written": written, "skipped": dict(sorted(skipped.items())), "skipped_total": sum(skipped.values()),
        "skipped_examples": dict(sorted(skipped_examples.items())),
    }
    for key, value in (extra_stats or {}).items():  # read now: counters fill while the examples stream
        stats[key] = dict(sorted(value.items())) if isinstance(value, collections.Counter) else value
    pathlib.Path(out_dir, f"{name}.stats.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats


def convert(layout: str, src, out_dir, name: str = "train", num_shards: int = 1, *, min_frames: int = 2,
            allow_empty_caption: bool = False, verify: str = "header", progress: bool = True,
            require_masks: bool = False) -> dict:
    """Converts ``src`` in ``layout`` (``folder`` | ``jsonl`` | ``multiview``) to shards; returns the stats."""
    if verify not in VERIFY_LEVELS:
        raise ValueError(f"verify must be one of {VERIFY_LEVELS}, got {verify!r}")
    common = dict(allow_empty_caption=allow_empty_caption, verify=verify)
    extra = {}
    if layout == "folder":
        total, examples = image_folder_examples(src, **common)
    elif layout == "jsonl":
        total, examples = jsonl_examples(src, **common)
    elif layout == "multiview":
        frame_skips = collections.Counter()
        total, examples = multiview_examples(src, min_frames=min_frames, frame_skips=frame_skips,
                                             require_masks=require_masks, **common)
        extra["frames_skipped"] = frame_skips
    else:
        raise ValueError(f"unknown layout {layout!r}; choose folder, jsonl or multiview")
    kind = "multiview" if layout == "multiview" else "text_image"
    return write_shards(examples, out_dir, name, num_shards, total=total, kind=kind, source=str(src),
                        progress=progress, extra_stats=extra)


def format_stats(stats: dict) -> str:
    lines = [f"{stats['name']}: wrote {stats['written']} {stats['kind']} records to {stats['num_shards']} shard(s); "
             f"skipped {stats['skipped_total']}"]
    lines += [f"  skipped {n} x {reason}" for reason, n in stats["skipped"].items()]
    lines += [f"  dropped {n} frame(s) x {reason}" for reason, n in stats.get("frames_skipped", {}).items()]
    return "\n".join(lines)


PROG = "customjax.data.convert"
LAYOUTS = ("folder", "jsonl", "multiview")
PARSE = dict(usage=f"python -m {PROG} {{{','.join(LAYOUTS)}}} SRC --out OUT [flags]", doc=__doc__,
             positionals=("LAYOUT", "SRC"))


def define_flags(flag_values=None) -> None:
    """The command's flags (defined on use, so that importing this module defines none), on absl's
    ``flags.FLAGS`` or ``flag_values``. Positional arguments: LAYOUT (folder, jsonl or multiview) and
    SRC (the source folder or JSONL manifest)."""
    from absl import flags

    fv = dict(flag_values=flags.FLAGS if flag_values is None else flag_values)
    flags.DEFINE_string("out", None, "output folder for the shards and <name>.stats.json", required=True, **fv)
    flags.DEFINE_string("name", "train", "shard file prefix", **fv)
    flags.DEFINE_integer("num_shards", 1, "number of ArrayRecord shards", lower_bound=1, **fv)
    flags.DEFINE_integer("min_frames", 2, "multiview: fewest usable frames per object", **fv)
    flags.DEFINE_bool("allow_empty_caption", False, "keep examples without a caption", **fv)
    flags.DEFINE_bool("require_masks", False, "multiview: every view needs a subject mask (masks/<frame>.png or "
                      "an alpha channel); a missing one is an error", **fv)
    flags.DEFINE_enum("verify", "header", list(VERIFY_LEVELS), "image check before writing: none, header (PIL "
                      "verify) or decode (as training does; slower)", **fv)
    flags.DEFINE_bool("no_progress", False, "no progress bar", **fv)


def main(argv, flag_values=None) -> int:
    """The command: ``argv`` is what absl's ``app.run`` passes (the program, LAYOUT, SRC), the flags
    parsed into ``flag_values`` (default ``flags.FLAGS``). In this process: :func:`command`."""
    from absl import flags

    from customjax.cli import fail

    f = flags.FLAGS if flag_values is None else flag_values
    _, layout, src = argv
    if layout not in LAYOUTS:
        fail(PROG, f"LAYOUT must be one of {', '.join(LAYOUTS)}, got {layout!r}")
    if not os.path.exists(src):
        fail(PROG, f"SRC {src}: no such file or folder")
    try:
        stats = convert(layout, src, f.out, f.name, f.num_shards, min_frames=f.min_frames,
                        allow_empty_caption=f.allow_empty_caption, verify=f.verify, progress=not f.no_progress,
                        require_masks=f.require_masks)
    except MissingMaskError as e:
        fail(PROG, str(e))
    print(format_stats(stats))
    print(f"stats: {pathlib.Path(f.out, f.name + '.stats.json')}")
    return 0


def command(args) -> int:
    """``python -m customjax.data.convert *args`` in this process (a fresh set of flags each call),
    e.g. ``command(["jsonl", "SRC.jsonl", "--out", "OUT"])``; returns the exit code."""
    from customjax.cli import call

    return call(PROG, define_flags, main, args, **PARSE)


if __name__ == "__main__":
    from customjax.cli import run

    run(PROG, define_flags, main, **PARSE)

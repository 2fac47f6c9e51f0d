"""``shapes``: coloured shapes with template captions, in COCO-captions and ImageFolder formats.

Each image shows 1..``max_shapes`` shapes on a black background, one per cell of a 3x3 grid, drawn with
PIL at 4x resolution and box-downsampled (antialiasing). Every attribute is recoverable from the image and
from each caption, so a classifier trained on these images can score generated ones.

The **primary** object (``objects[0]``) defines the image's class for the ImageFolder copy. It is the
unique largest object: a single object is small or large at random; with several objects the primary
is large and the others are small, so the class of an image is never ambiguous. ``primary_size="large"``
(opt-in) makes a single object large too, so every class object is large; the random draws are the
same as the default's (the size draw is made and then overridden), so the two variants share shapes,
colours, cells and captions' order, and differ only in the sizes (and jitter range) of single objects.
``primary_size="huge"`` keeps only the class object, moved to the centre and enlarged to a radius of 1.1
cells (0.37 of the image side; size name ``huge``). Primary shapes are
balanced within each split (every class appears in every split, which ``torchvision`` ImageFolder
requires).

Layout written under ``out_dir``::

    train/train_000001.png ...             images (COCO ``train2014/`` style)
    val/val_000449.png ...
    annotations/captions_train.json        COCO captions: info, licenses, images[{id, file_name, width,
    annotations/captions_val.json            height}], annotations[{id, image_id, caption}]
    annotations/attributes_train.json      per image: id, file_name, label, label_name, objects[{shape,
    annotations/attributes_val.json          colour, size, position, cell, center, bbox}], captions
    imagefolder/{train,val}/<shape>/*.png  same images, foldered by the primary shape
    README.md, dataset_info.json

Image ids are 1-based and unique over both splits; ``bbox`` is COCO ``[x, y, width, height]`` in pixels.
"""
from __future__ import annotations

import io
import math
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from .common import FORMAT_VERSION, INFO_FILE, prepare_out_dir, write_json, write_text, writer_config

__all__ = ["SHAPES", "COLOURS", "SIZES", "POSITIONS", "TEMPLATES", "PRIMARY_SIZES", "render_shapes",
           "write_shapes", "sizes_of"]

SHAPES = ("circle", "square", "triangle", "diamond", "star")
# Saturated, mutually distinct colours that stay distinct after downsampling to 32 px.
COLOURS = {
    "red": (230, 25, 25),
    "green": (30, 180, 40),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "cyan": (30, 210, 220),
    "orange": (245, 130, 20),
    "white": (235, 235, 235),
}
# Radius (centre to farthest point) as a fraction of a grid cell.
SIZES = {"small": 0.26, "large": 0.44, "huge": 1.1}
# Row-major 3x3 grid: cell index = 3 * row + column.
POSITIONS = ("top left", "top middle", "top right",
             "middle left", "center", "middle right",
             "bottom left", "bottom middle", "bottom right")
# Caption templates; ``{objects}`` is filled per object with ``part`` and joined with commas / "and".
TEMPLATES = (
    {"part": "a {size} {colour} {shape} in the {position}", "whole": "{objects}"},
    {"part": "a {size} {colour} {shape} in the {position}", "whole": "there is {objects}"},
    {"part": "a {size} {colour} {shape} at the {position}", "whole": "an image of {objects}"},
    {"part": "in the {position} there is a {size} {colour} {shape}", "whole": "{objects}"},
    {"part": "a {colour} {shape} of {size} size in the {position}", "whole": "a black picture with {objects}"},
)
# ``write_shapes(primary_size=...)``: "mixed" (default) = a lone object is small or large at random,
# "large" = the primary (class) object is always large, "huge" = the class object alone, centred, spanning
# about 3/4 of the image (radius 1.1 cells = 0.37 of the image side).
PRIMARY_SIZES = ("mixed", "large", "huge")
_SUPERSAMPLE = 4
_IMAGE_SIZES = (32, 64, 128)


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of ``shape`` centred at (cx, cy) with circumradius r; None for a circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = r / math.sqrt(2.0)
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        # equilateral, apex up; centred on its circumcentre
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in np.deg2rad([-90.0, 30.0, 150.0])]
    if shape == "diamond":
        return [(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)]
    if shape == "star":
        # five points; inner radius 0.45 r keeps the arms thick enough to read at 32 px
        return [(cx + rr * math.cos(a), cy + rr * math.sin(a))
                for k in range(10)
                for rr, a in [(r if k % 2 == 0 else 0.45 * r, math.radians(-90.0 + 36.0 * k))]]
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render_shapes(objects: list[dict[str, Any]],
                  image_size: int = 64) -> tuple[Image.Image, list[dict[str, list[float]]]]:
    """Draw ``objects`` (dicts with shape, colour, size, cell and ``offset`` (dx, dy) in cell units).

    Returns the RGB image and, per object, ``{"bbox": [x, y, w, h], "center": [x, y]}`` in output pixels
    (COCO bbox; the center is the shape's own centre, e.g. a triangle's circumcentre, always inside it).
    """
    ss = _SUPERSAMPLE
    big = image_size * ss
    cell = big / 3.0
    canvas = Image.new("RGB", (big, big), (0, 0, 0))
    draw = ImageDraw.Draw(canvas)
    geometry = []
    for obj in objects:
        row, col = divmod(obj["cell"], 3)
        cx = (col + 0.5 + obj["offset"][0]) * cell
        cy = (row + 0.5 + obj["offset"][1]) * cell
        r = SIZES[obj["size"]] * cell
        fill = COLOURS[obj["colour"]]
        pts = _outline(obj["shape"], cx, cy, r)
        if pts is None:
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
            xs, ys = [cx - r, cx + r], [cy - r, cy + r]
        else:
            draw.polygon(pts, fill=fill)
            xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        x0, y0 = min(xs) / ss, min(ys) / ss
        geometry.append({
            "bbox": [round(x0, 2), round(y0, 2), round(max(xs) / ss - x0, 2), round(max(ys) / ss - y0, 2)],
            "center": [round(cx / ss, 2), round(cy / ss, 2)]})
    return canvas.resize((image_size, image_size), Image.Resampling.BOX), geometry


def _sample_objects(rng: np.random.Generator, primary_shape: int, max_shapes: int,
                   primary_size: str = "mixed") -> list[dict[str, Any]]:
    k = int(rng.integers(1, max_shapes + 1))
    cells = rng.choice(len(POSITIONS), size=k, replace=False)
    objects = []
    for i in range(k):
        shape = SHAPES[primary_shape] if i == 0 else SHAPES[int(rng.integers(len(SHAPES)))]
        if k == 1:
            size = ("small", "large")[int(rng.integers(2))]   # drawn in both modes: same stream
            if primary_size == "large":
                size = "large"
        else:
            size = "large" if i == 0 else "small"
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        # jitter inside the cell, never crossing its border, so the named position stays true
        slack = 0.8 * (0.5 - SIZES[size])
        offset = [round(float(v), 4) for v in rng.uniform(-slack, slack, size=2)]
        objects.append({"shape": shape, "colour": colour, "size": size, "cell": int(cells[i]),
                        "position": POSITIONS[int(cells[i])], "offset": offset})
    if primary_size == "huge":
        # the default's draws for this image, then only the class object is kept, moved to the centre cell
        # and enlarged (its jitter rescaled to the image's slack); with max_shapes 1 the whole dataset
        # matches the default one object for object, else the captions' draws differ from the next image on
        primary = objects[0]
        slack = 0.8 * (1.5 - SIZES["huge"])
        scale = slack / max(0.8 * (0.5 - SIZES[primary["size"]]), 1e-9)
        primary.update(size="huge", cell=4, position=POSITIONS[4],
                       offset=[round(v * scale, 4) for v in primary["offset"]])
        objects = [primary]
    return objects


def sizes_of(primary_size: str) -> list[str]:
    """The size names the objects of a ``primary_size`` variant take: small and large, or huge alone (so the
    default data's files are the same bytes as before the huge variant existed)."""
    return ["huge"] if primary_size == "huge" else ["small", "large"]


def _captions(rng: np.random.Generator, objects: list[dict[str, Any]], n: int) -> list[str]:
    captions = []
    for t in rng.permutation(len(TEMPLATES))[:n]:
        template = TEMPLATES[int(t)]
        order = rng.permutation(len(objects))
        parts = [template["part"].format(**objects[int(j)]) for j in order]
        captions.append(template["whole"].format(objects=_join(parts)))
    return captions


def write_shapes(out_dir: str | os.PathLike, num_images: int = 512, image_size: int = 64, seed: int = 0,
                 max_shapes: int = 2, val_fraction: float = 0.125, captions_per_image: int = 5,
                 overwrite: bool = False, progress: bool = True, primary_size: str = "mixed") -> dict[str, Any]:
    """Write the ``shapes`` dataset (layout in the module docstring); deterministic in ``seed``.

    Args:
        out_dir: dataset root; created if missing (see :func:`cmgen.data.common.prepare_out_dir`).
        num_images: total images over both splits.
        image_size: 32, 64 or 128 pixels.
        max_shapes: each image has 1..max_shapes shapes (at most 9, one per grid cell).
        val_fraction: share of images in ``val``; 0 writes no val split.
        captions_per_image: distinct caption templates per image, 1..len(TEMPLATES).
        overwrite: replace a different dataset already in ``out_dir``.
        progress: show a tqdm bar.
        primary_size: ``"mixed"`` (default): a lone object is small or large at random (with several,
            the primary is large); ``"large"``: the primary (class) object is always large. Recorded in
            ``dataset_info.json``'s config only when not ``"mixed"``, so data written before the option
            existed is still recognised as the same dataset.

    Returns:
        ``dataset_info.json``'s content plus ``"root"`` (absolute path).
    """
    if image_size not in _IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {_IMAGE_SIZES}, got {image_size}")
    if not 1 <= max_shapes <= len(POSITIONS):
        raise ValueError(f"max_shapes must be in [1, {len(POSITIONS)}], got {max_shapes}")
    if not 1 <= captions_per_image <= len(TEMPLATES):
        raise ValueError(f"captions_per_image must be in [1, {len(TEMPLATES)}], got {captions_per_image}")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if primary_size not in PRIMARY_SIZES:
        raise ValueError(f"primary_size must be one of {PRIMARY_SIZES}, got {primary_size!r}")
    num_val = int(round(num_images * val_fraction))
    split_sizes = {"train": num_images - num_val, "val": num_val}
    for split, n in split_sizes.items():
        if (split == "train" or n > 0) and n < len(SHAPES):
            raise ValueError(f"split {split!r} would have {n} images (num_images={num_images}, "
                             f"val_fraction={val_fraction}); each split needs >= {len(SHAPES)}, one per class")
    # the one rule for what dataset_info.json records (config_omits_default below), shared with the digest
    config = writer_config("shapes", dict(num_images=num_images, image_size=image_size, seed=seed,
                                          max_shapes=max_shapes, val_fraction=val_fraction,
                                          captions_per_image=captions_per_image, primary_size=primary_size))
    root = prepare_out_dir(out_dir, "shapes", config, overwrite)

    rng = np.random.default_rng(seed)
    splits = [s for s, n in split_sizes.items() if n > 0]
    image_id, caption_id = 1, 1
    files: dict[str, dict[str, str]] = {"captions": {}, "attributes": {}, "images": {}, "imagefolder": {}}
    bar = tqdm(total=num_images, desc="shapes", unit="img", disable=not progress)
    for split in splits:
        n = split_sizes[split]
        # balanced primary shapes, in random order
        primaries = rng.permutation(np.resize(np.arange(len(SHAPES)), n))
        coco_images, coco_annotations, records = [], [], []
        for i in range(n):
            objects = _sample_objects(rng, int(primaries[i]), max_shapes, primary_size)
            captions = _captions(rng, objects, captions_per_image)
            image, geometry = render_shapes(objects, image_size)
            for obj, geo in zip(objects, geometry):
                obj.update(geo)
                del obj["offset"]
            buf = io.BytesIO()
            image.save(buf, format="PNG", optimize=False)
            file_name = f"{split}_{image_id:06d}.png"
            label_name = objects[0]["shape"]
            for rel in (Path(split) / file_name, Path("imagefolder") / split / label_name / file_name):
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(buf.getvalue())
            coco_images.append({"id": image_id, "file_name": file_name, "width": image_size,
                                "height": image_size})
            for caption in captions:
                coco_annotations.append({"id": caption_id, "image_id": image_id, "caption": caption})
                caption_id += 1
            records.append({"id": image_id, "file_name": file_name, "label": SHAPES.index(label_name),
                            "label_name": label_name, "objects": objects, "captions": captions})
            image_id += 1
            bar.update(1)
        captions_rel = f"annotations/captions_{split}.json"
        attributes_rel = f"annotations/attributes_{split}.json"
        write_json(root / captions_rel, {
            "info": {"description": f"cmgen shapes {split} captions (COCO captions format)",
                     "version": str(FORMAT_VERSION)},
            "licenses": [], "images": coco_images, "annotations": coco_annotations})
        write_json(root / attributes_rel, {
            "classes": list(SHAPES), "colours": COLOURS, "sizes": sizes_of(primary_size), "positions": list(POSITIONS),
            "image_size": image_size, "images": records})
        files["captions"][split] = captions_rel
        files["attributes"][split] = attributes_rel
        files["images"][split] = split
        files["imagefolder"][split] = f"imagefolder/{split}"
    bar.close()

    info = {
        "dataset": "shapes", "format_version": FORMAT_VERSION, "config": config,
        "classes": list(SHAPES), "class_definition": "shape of the primary (unique largest) object",
        "num_images": split_sizes, "files": files,
    }
    write_text(root / "README.md", _readme(config, split_sizes))
    write_json(root / INFO_FILE, info)
    return {**info, "root": str(root.resolve())}


# settings recorded in dataset_info.json only when not at their default (data written before they existed
# stays the same dataset for prepare_out_dir and writer_config)
write_shapes.config_omits_default = ("primary_size",)


def _readme(config: dict[str, Any], split_sizes: dict[str, int]) -> str:
    doc = __doc__.split("Layout written under ``out_dir``::", 1)[1]
    return (
        "# cmgen shapes\n\n"
        "Synthetic coloured shapes with template captions, written by `cmgen data shapes` "
        f"(config: `{config}`; images: {split_sizes}).\n\n"
        "Each image has 1..max_shapes shapes on black, one per cell of a 3x3 grid "
        f"({', '.join(POSITIONS)}); shapes {', '.join(SHAPES)}; colours {', '.join(COLOURS)}; sizes "
        "small/large. The ImageFolder class is the shape of the primary object (`objects[0]`), the unique "
        "largest one" + {"large": " (always large here: primary_size large)",
                         "huge": " (here the only one, centred and huge: primary_size huge)"}.get(
                             config.get("primary_size"), "") + ".\n\nLayout:\n\n```\n" + textwrap.dedent(doc).strip("\n") + "\n```\n"
    )

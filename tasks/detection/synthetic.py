"""The embedded default data of the detection task: seeded scenes written as a real COCO tree
(`annotations/instances_{train,val}2017.json` + `{train,val}2017/*.jpg`), so the real reader
(pycocotools) is the code that runs on them.

Scenes hold textured, coloured shapes of four real COCO categories on a cluttered background.
Each scene is one of four kinds, drawn at random:
  large  1-2 objects of 40-70% of the short side: still plain, and boxed to within a few per
         cent, after resizing to 50 px (at 25-55% the 50 px expert scored 0.34 mAP on them
         against the 150 px expert's 0.62, so no scene was cheap: routing had nothing to gain);
  medium 2-4 objects of 12-22% of the short side: a few pixels wide at 50 px, plain at 100 px;
  small  3-8 objects of 4-9% of the short side: a few pixels at low resolution, so only the
         high-resolution expert finds them;
  mixed  one large object and 2-5 small ones.
So each rung of the demo's ladder (50, 100, 150 px) is the cheapest that suffices for some scenes.
Clutter (distractor strokes and blobs of no category) is drawn independently of the kind, so
edge density alone does not tell a gate which scenes need resolution.

Tried and not kept (demo, experts at 16 epochs): without the mixed kind the Table IV gate, trained
on the kinds themselves, told large scenes from the rest 86-89 % of the time (mixed ones it calls
large as often as not), yet enforce's routing efficiency was 0.37 with seed 0 and 0.06 with seed 1,
and a router told each scene's kind 0.61 and 0.25. Even on large scenes the 50 px expert stays well
below the 150 px one (per-image AP 0.56-0.62 against 0.73-0.81): mAP@[.5:.95] counts a box a
pixel off at 50 px.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["CATEGORIES", "CATEGORY_IDS", "KINDS", "scene", "write_coco_tree"]

# Real COCO category ids and names; each drawn as one shape in a colour family.
CATEGORIES = (
    {"id": 13, "name": "stop sign", "supercategory": "outdoor"},  # octagon, reds
    {"id": 37, "name": "sports ball", "supercategory": "sports"},  # disc, oranges/whites
    {"id": 38, "name": "kite", "supercategory": "sports"},  # triangle, blues
    {"id": 60, "name": "donut", "supercategory": "food"},  # ring, browns
)
CATEGORY_IDS = tuple(c["id"] for c in CATEGORIES)
KINDS = ("large", "medium", "small", "mixed")
_HUES = {13: (0.97, 1.03), 37: (0.06, 0.14), 38: (0.55, 0.68), 60: (0.07, 0.11)}  # HSV hue ranges
_SIZES = {"large": (0.40, 0.70), "medium": (0.12, 0.22), "small": (0.04, 0.09)}  # object side / image short side


def scene(rng: np.random.Generator, width: int = 320, height: int = 240, kind: str | None = None
          ) -> tuple[np.ndarray, list[dict], str]:
    """One scene: (H, W, 3) uint8 image, its annotations (bbox xywh, category_id, area) and kind."""
    kind = kind or KINDS[int(rng.integers(len(KINDS)))]
    image = _background(rng, width, height)  # (H, W, 3) float in [0, 255]
    _clutter(rng, image, n=int(rng.integers(0, 12)))
    if kind == "large":
        sizes = ["large"] * int(rng.integers(1, 3))
    elif kind == "medium":
        sizes = ["medium"] * int(rng.integers(2, 5))
    elif kind == "small":
        sizes = ["small"] * int(rng.integers(3, 9))
    elif kind == "mixed":
        sizes = ["large"] + ["small"] * int(rng.integers(2, 6))
    else:
        raise ValueError(f"unknown scene kind {kind!r}; expected one of {', '.join(KINDS)}")
    short = min(width, height)
    annotations, placed = [], []
    for size in sizes:
        lo, hi = _SIZES[size]
        side = max(4, int(round(short * rng.uniform(lo, hi))))
        box = _free_spot(rng, side, width, height, placed)
        if box is None:
            continue
        placed.append(box)
        category = int(rng.choice(CATEGORY_IDS))
        mask = _shape_mask(category, side, rng)  # (side, side) bool
        x, y = box[0], box[1]
        image[y:y + side, x:x + side][mask] = _texture(rng, category, side)[mask]
        ys, xs = np.nonzero(mask)
        annotations.append({"bbox": [float(x + xs.min()), float(y + ys.min()), float(xs.max() - xs.min() + 1),
                                     float(ys.max() - ys.min() + 1)],
                            "category_id": category, "area": float(mask.sum()), "iscrowd": 0})
    return np.clip(image, 0, 255).astype(np.uint8), annotations, kind


def write_coco_tree(root: Path, counts: dict[str, int], seed: int = 0, width: int = 320, height: int = 240,
                    quality: int = 90) -> Path:
    """Write `counts[split]` scenes per COCO split ('train2017', 'val2017') as JPEG files and an
    instances JSON per split under root; image and annotation ids are unique across splits."""
    root = Path(root)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    image_id, ann_id = 1, 1
    for s, (split, count) in enumerate(sorted(counts.items())):
        rng = np.random.default_rng([seed, s])
        folder = root / split
        folder.mkdir(parents=True, exist_ok=True)
        images, annotations = [], []
        for _ in range(count):
            pixels, anns, kind = scene(rng, width, height)
            name = f"{image_id:012d}.jpg"
            Image.fromarray(pixels).save(folder / name, quality=quality)
            images.append({"id": image_id, "file_name": name, "width": width, "height": height, "kind": kind})
            for ann in anns:
                annotations.append({"id": ann_id, "image_id": image_id, **ann})
                ann_id += 1
            image_id += 1
        instances = {"info": {"description": "bmoe synthetic scenes in COCO format", "version": "1"},
                     "licenses": [], "images": images, "annotations": annotations, "categories": list(CATEGORIES)}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(instances))
    return root


# -- drawing ------------------------------------------------------------------------------------


def _background(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A smooth colour gradient with mild noise, (H, W, 3) float32."""
    c0, c1 = rng.uniform(40, 200, 3).astype(np.float32), rng.uniform(40, 200, 3).astype(np.float32)
    angle = np.float32(rng.uniform(0, 1))
    t = (angle * np.linspace(0, 1, width, dtype=np.float32)[None, :]
         + (1 - angle) * np.linspace(0, 1, height, dtype=np.float32)[:, None])  # (H, W)
    noise = rng.integers(-10, 11, (height, width, 3), dtype=np.int8).astype(np.float32)
    return c0 + (c1 - c0) * t[..., None] + noise


def _clutter(rng: np.random.Generator, image: np.ndarray, n: int) -> None:
    """Distractor strokes and blobs of no category, drawn in place."""
    height, width = image.shape[:2]
    canvas = Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(n):
        x, y = rng.uniform(0, width), rng.uniform(0, height)
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        if rng.random() < 0.6:
            dx, dy = rng.normal(0, width / 5, 2)
            draw.line([(x, y), (x + dx, y + dy)], fill=colour, width=int(rng.integers(1, 4)))
        else:
            r = rng.uniform(2, 10)
            draw.rectangle([x - r, y - r * rng.uniform(0.3, 1), x + r, y + r], fill=colour)
    image[...] = np.asarray(canvas, dtype=np.float32)


def _free_spot(rng: np.random.Generator, side: int, width: int, height: int, placed: list) -> tuple | None:
    """Top-left of a side x side square inside the image overlapping no placed one, or None."""
    for _ in range(30):
        x, y = int(rng.integers(0, width - side + 1)), int(rng.integers(0, height - side + 1))
        if all(x + side <= px or px + ps <= x or y + side <= py or py + ps <= y for px, py, ps in placed):
            return x, y, side
    return None


def _shape_mask(category: int, side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side) bool mask of the category's shape."""
    layer = Image.new("L", (side, side), 0)
    draw = ImageDraw.Draw(layer)
    s = side - 1
    if category == 13:  # octagon
        c = s * 0.29
        draw.polygon([(c, 0), (s - c, 0), (s, c), (s, s - c), (s - c, s), (c, s), (0, s - c), (0, c)], fill=255)
    elif category == 37:  # disc
        draw.ellipse([0, 0, s, s], fill=255)
    elif category == 38:  # triangle, pointing up or down
        if rng.random() < 0.5:
            draw.polygon([(s / 2, 0), (s, s), (0, s)], fill=255)
        else:
            draw.polygon([(0, 0), (s, 0), (s / 2, s)], fill=255)
    else:  # ring
        draw.ellipse([0, 0, s, s], fill=255)
        hole = s * 0.3
        draw.ellipse([hole, hole, s - hole, s - hole], fill=0)
    return np.asarray(layer) > 0


def _texture(rng: np.random.Generator, category: int, side: int) -> np.ndarray:
    """(side, side, 3) float: the category's colour family with stripes or speckle."""
    lo, hi = _HUES[category]
    hue = rng.uniform(lo, hi) % 1.0
    base = _hsv_to_rgb(hue, rng.uniform(0.6, 1.0), rng.uniform(0.6, 1.0)) * 255.0
    yy, xx = np.mgrid[0:side, 0:side]
    if rng.random() < 0.5:
        period = rng.uniform(3, 8)
        pattern = np.sin((xx * np.cos(rng.uniform(0, np.pi)) + yy) * 2 * np.pi / period)
    else:
        pattern = rng.normal(0, 0.6, (side, side))
    return base[None, None, :] * (0.8 + 0.2 * pattern[..., None])


def _hsv_to_rgb(h: float, s: float, v: float) -> np.ndarray:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    return np.array([(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i])

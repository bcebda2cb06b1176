"""Real detection data: a COCO tree read with pycocotools, split into train/val/test, with every
unusable item named and counted.

Layout: `<root>/annotations/instances_<name>.json` with images in `<root>/<name>/`.
Split rules:
* instances_train2017.json and instances_val2017.json both present: train = train2017; COCO has
  no public test annotations, so val2017 is halved by a hash of the image id: val and test.
* one instances JSON only (users often hold val2017 alone): its images go to train/val/test at
  60/20/20 by the rank of a hash of the image id (every split gets one when there are >= 3).
Category ids stay COCO's own end to end.

Problems (one line each; past LIMIT per kind a count line): images listed but not on disk,
annotations of images not listed, categories outside the task's label set, zero-area boxes
(left out), boxes reaching outside their image by more than a pixel (clipped; left out if
nothing is left). Unreadable JPEGs are found by load_image, when the image is decoded.

The root is a local folder or an object-store URI: the instances JSON is read through its path,
and each image folder is listed once (a set of names), never probed one file_name at a time.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re

import numpy as np
from PIL import Image, UnidentifiedImageError

from storage import AnyPath
from tasks.images import to_rgb
from tasks.base import BadDataRoot
from tasks.inputs import file_stamp, files_in, input_path, read_input, unreadable

__all__ = ["BadDataRoot", "BadImage", "LIMIT", "declared_categories", "find_instances", "list_split", "load_image"]

SPLITS = ("train", "val", "test")
LIMIT = 20  # problems named per kind and split; the rest are counted
TOLERANCE = 1.0  # pixels a box may reach outside its image before it is reported (rounding)
_BYTES_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # Pillow names the buffer it read




class BadImage(ValueError):
    """An image file that cannot be used; the message names the file and the reason."""


def find_instances(root: AnyPath | str) -> dict[str, tuple[AnyPath, AnyPath]]:
    """{name: (instances JSON, image folder)} for every annotations/instances_<name>.json."""
    root = input_path(root)
    folder = root / "annotations"
    found = {p.stem.removeprefix("instances_"): (p, root / p.stem.removeprefix("instances_"))
             for p in sorted(folder.glob("instances_*.json"))} if folder.is_dir() else {}
    if not found:
        raise BadDataRoot(f"{root}: no annotations/instances_*.json; expected COCO's layout "
                          "annotations/instances_{train,val}2017.json with train2017/ and val2017/ image folders")
    return found


def declared_categories(root: AnyPath | str) -> list[int]:
    """The category ids the tree's smallest instances JSON declares (COCO's files share them):
    the label set of a real data root, read without parsing the 450 MB train JSON."""
    instances = find_instances(root)
    path = min((p for p, _ in instances.values()), key=lambda p: p.stat().st_size)
    try:
        ids = sorted({int(c["id"]) for c in json.loads(path.read_bytes()).get("categories", [])})
    except (OSError, ValueError, TypeError, KeyError, AttributeError) as err:
        raise BadDataRoot(f"{path}: no readable categories ({type(err).__name__}: {err})") from None
    if not ids or ids[0] < 1:
        raise BadDataRoot(f"{path}: declares no categories with ids from 1; expected COCO's 'categories' list")
    return ids


def list_split(root: AnyPath | str, split: str, categories: tuple[int, ...]) -> tuple[list[dict], list[str]]:
    """The images of `split` as sources (id, path, stamp, size, annotations) and the problems found.

    Each source's "anns" rows are [x, y, w, h, category_id, iscrowd, area] in image pixels; its
    "path" is the image's text (a URI for a remote file) and "stamp" its [st_size, st_mtime_ns]
    from the folder's listing.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    instances = find_instances(root)
    paired = "train2017" in instances and "val2017" in instances
    if paired:
        name = "train2017" if split == "train" else "val2017"
        fractions = None if split == "train" else {"val": 0.5, "test": 0.5}
    else:
        name = "train2017" if "train2017" in instances else sorted(instances)[0]
        fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    json_path, image_dir = instances[name]
    used = {"train2017", "val2017"} if paired else {name}
    unused = [instances[other][0] for other in sorted(set(instances) - used)]
    notes = [f"{p}: not read (the splits come from {' and '.join(f'instances_{u}.json' for u in sorted(used))})"
             for p in unused] if split == "train" else []  # named once, with the first split
    coco = _load_coco(json_path)
    image_ids = sorted(coco.imgs)
    if fractions is not None:
        image_ids = _hash_split(image_ids, fractions)[split]
    problems = _Problems(json_path.name, split)
    known = {int(c) for c in coco.cats}
    wanted = set(categories)
    if fractions is None or split == next(iter(fractions)):  # a file's orphans are named once, in its first split
        for ann in coco.dataset.get("annotations", []):
            if ann.get("image_id") not in coco.imgs:
                problems.add("orphan", f"annotation {ann.get('id')}: image {ann.get('image_id')} is not listed; "
                                       "left out")
    present = files_in(image_dir)  # one listing of the folder, not one request per listed image
    sources, missing = [], 0
    for image_id in image_ids:
        info = coco.imgs[image_id]
        file_name = str(info.get("file_name", ""))
        path = _present(image_dir, file_name, present)
        stamp = file_stamp(path) if path is not None else None
        if stamp is None:
            missing += 1
            problems.add("missing", f"{_joined(image_dir, file_name)}: listed in {json_path.name} but not on disk; "
                                    "left out")
            continue
        width, height = int(info.get("width", 0)), int(info.get("height", 0))
        anns = []
        for ann in coco.imgToAnns.get(image_id, []):
            row = _annotation_row(ann, width, height, known, wanted, path.name, problems)
            if row is not None:
                anns.append(row)
        sources.append({"source_id": str(image_id), "path": str(path), "stamp": stamp, "image_id": int(image_id),
                        "width": width, "height": height, "anns": anns})
    if missing:
        problems.lines.append(f"{json_path.name} ({split}): {missing} of {len(image_ids)} listed images are not "
                              f"under {image_dir}; the {len(sources)} present are used")
    return sources, notes + problems.finish()


def _present(image_dir: AnyPath, file_name: str, present: dict[str, AnyPath]) -> AnyPath | None:
    """The listed path of `file_name` if the folder's listing holds it, else None. A file_name
    with a folder in it (not COCO's own layout) is checked on its own."""
    if "/" not in file_name:
        return present.get(file_name)
    try:
        path = image_dir / file_name
    except ValueError:  # '.' or '..' in an object-store key
        return None
    return path if path.is_file() else None


def _joined(image_dir: AnyPath, file_name: str) -> str:
    """The text of image_dir / file_name, for a message (even where a store refuses the key)."""
    try:
        return str(image_dir / file_name)
    except ValueError:
        return f"{image_dir}/{file_name}"


def load_image(path: AnyPath | str, width: int, height: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB of one listed image, read through its path then decoded from its bytes;
    tasks.UnreadableInput if this node cannot read it, BadImage if it does not decode or is not
    the JSON's size."""
    path = input_path(path)
    data = read_input(path)
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()
            rgb = to_rgb(img)  # 16-bit grayscale scaled, not clipped to white; MPO: its first picture
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        reason = _BYTES_REPR.sub("", str(err))
        raise BadImage(f"{path}: not a readable image ({type(err).__name__}: {reason}); left out") from None
    if rgb.shape[:2] != (height, width):
        raise BadImage(f"{path}: image is {rgb.shape[1]}x{rgb.shape[0]} but its JSON entry says "
                       f"{width}x{height}; left out")
    return rgb


class _Problems:
    """Problem lines of one split: the first LIMIT of each kind by name, then a count."""

    def __init__(self, json_name: str, split: str):
        self.prefix = f"{json_name} ({split})"
        self.lines: list[str] = []
        self.counts: dict[str, int] = {}

    def add(self, kind: str, line: str) -> None:
        self.counts[kind] = self.counts.get(kind, 0) + 1
        if self.counts[kind] <= LIMIT:
            self.lines.append(line)

    def finish(self) -> list[str]:
        for kind, count in self.counts.items():
            if count > LIMIT:
                self.lines.append(f"{self.prefix}: {count - LIMIT} more '{kind}' problems like the above "
                                  f"({count} in all)")
        return self.lines


def _annotation_row(ann: dict, width: int, height: int, known: set, wanted: set, image: str,
                    problems: _Problems) -> list[float] | None:
    """[x, y, w, h, category_id, iscrowd, area] of a usable annotation, or None (reported)."""
    ident = f"{image}: annotation {ann.get('id')}"
    category = ann.get("category_id")
    if category not in known:
        problems.add("category", f"{ident}: category {category} is not in the JSON's categories; left out")
        return None
    if category not in wanted:
        problems.add("label set", f"{ident}: category {category} is outside this task's label set "
                                  f"({len(wanted)} categories; see the 'categories' setting); left out")
        return None
    try:
        x, y, w, h = (float(v) for v in ann["bbox"])
    except (KeyError, TypeError, ValueError):
        problems.add("bbox", f"{ident}: no usable bbox {ann.get('bbox')!r}; left out")
        return None
    if not (w > 0 and h > 0):
        problems.add("zero area", f"{ident}: zero-area box {[x, y, w, h]}; left out")
        return None
    x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, float(width)), min(y + h, float(height))
    if x < -TOLERANCE or y < -TOLERANCE or x + w > width + TOLERANCE or y + h > height + TOLERANCE:
        if x1 <= x0 or y1 <= y0:
            problems.add("outside", f"{ident}: box {[x, y, w, h]} lies outside the {width}x{height} image; left out")
            return None
        problems.add("outside", f"{ident}: box {[x, y, w, h]} reaches outside the {width}x{height} image; "
                                "clipped to it")
    if x1 <= x0 or y1 <= y0:
        problems.add("zero area", f"{ident}: box {[x, y, w, h]} has no area inside the image; left out")
        return None
    area = float(ann.get("area") or (x1 - x0) * (y1 - y0))
    return [x0, y0, x1 - x0, y1 - y0, float(category), float(bool(ann.get("iscrowd", 0))), area]


def _load_coco(path: AnyPath):
    """pycocotools' COCO index of an instances JSON read through its path (never by file name)."""
    from pycocotools.coco import COCO

    try:
        data = path.read_bytes()
    except OSError as err:  # listed a moment ago: gone, no permission, or the store refused
        raise BadDataRoot(str(unreadable(path, err))) from None
    try:
        dataset = json.loads(data)
        if not isinstance(dataset, dict):  # what COCO(file) asserts
            raise AssertionError(f"annotation file format {type(dataset)} not supported")
        with contextlib.redirect_stdout(io.StringIO()):
            coco = COCO()
            coco.dataset = dataset
            coco.createIndex()
        return coco
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BadDataRoot(f"{path}: not valid JSON ({err}); expected a COCO instances file") from None
    except (KeyError, TypeError, AssertionError) as err:
        raise BadDataRoot(f"{path}: not a COCO instances file (missing or malformed {err})") from None


def _hash_split(image_ids: list[int], fractions: dict[str, float]) -> dict[str, list[int]]:
    """Image ids to splits by the rank of a hash of each id: stable across runs and machines;
    each split gets at least one image when there are at least as many images as splits."""
    order = sorted(image_ids, key=lambda i: hashlib.sha256(str(i).encode()).hexdigest())
    names = list(fractions)
    counts = [int(round(fractions[s] * len(order))) for s in names]
    if len(order) >= len(names):
        counts = [max(1, c) for c in counts]
    counts[0] = len(order) - sum(counts[1:])  # the first split takes the rounding
    out, start = {}, 0
    for name, count in zip(names, counts):
        out[name] = sorted(order[start:start + count])
        start += count
    return out

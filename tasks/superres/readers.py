"""Real super-resolution data: list a DIV2K tree, a Set5-style folder or any folder of
PNG/JPEG images into train/val/test, and decode one image to (H, W, 3) uint8 RGB.

We make our own bicubic LR inputs from the HR images (patches.downscale), so LR folders that
ship with a dataset are only recognised (ImageListing.lr_dirs), never required.

Split rules
-----------
* DIV2K (``<root>/DIV2K_train_HR``, ``<root>/DIV2K_valid_HR``): train = every image of
  DIV2K_train_HR; DIV2K has no public test HR, so its validation set is halved: val = the first
  ceil(n/2) files of DIV2K_valid_HR in name order (0801-0850), test = the rest (0851-0900).
  With DIV2K_train_HR alone (the usual partial download), its images are split by name hash as
  a plain folder's, and the listing says so.
* Split folders (``<root>/train``, ``<root>/val`` or ``<root>/valid``, ``<root>/test``; at least
  train and one other): each split is its folder (or that folder's ``HR/``), as it is.
* Any other folder (its ``HR/`` subfolder if there is one, as in Set5/Set14: ``HR/``, ``X2/`` ...):
  each file goes by a hash of its name to train/val/test at 60/20/20, so adding a file never moves
  another one. With >= 3 images every split is guaranteed at least one image (see _hash_split).
"""

from __future__ import annotations

import hashlib
import io
import math
import re
from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageOps

from storage import AnyPath
from tasks.images import to_rgb
from tasks.base import BadDataRoot
from tasks.inputs import input_path, read_input

__all__ = [
    "BadImage",
    "BadDataRoot",
    "ImageListing",
    "IMAGE_SUFFIXES",
    "MIN_SIDE",
    "find_images",
    "list_image_files",
    "load_rgb",
]

SPLITS = ("train", "val", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
MIN_SIDE = 64  # one patch: a smaller image gives no sample at all
HASH_FRACTIONS = {"train": 0.6, "val": 0.2, "test": 0.2}

# Files that are plainly not images: skipped without a word. Anything else that is not
# PNG/JPEG (.bmp, .tif, .webp, no suffix ...) might be someone's image, so it is reported.
_NOT_IMAGES = {
    ".txt", ".md", ".rst", ".json", ".yaml", ".yml", ".csv", ".tsv", ".xml", ".html", ".pdf",
    ".py", ".sh", ".zip", ".tar", ".gz", ".npy", ".npz", ".mat", ".db", ".ini", ".log",
}
_DIV2K_HR = {"train": "DIV2K_train_HR", "valid": "DIV2K_valid_HR"}
_DIV2K_LR = {"train": "DIV2K_train_LR_bicubic", "valid": "DIV2K_valid_LR_bicubic"}
_SCALE_DIR = re.compile(r"^[Xx]([2-8])$")
_SPLIT_DIRS = {"train": ("train",), "val": ("val", "valid"), "test": ("test",)}
_BYTES_REPR = re.compile(r"\s*<_io\.BytesIO object at 0x[0-9a-fA-F]+>")  # Pillow names the buffer it read


class BadImage(ValueError):
    """An image file that cannot be used; the one-line message names the file and the reason."""




@dataclass
class ImageListing:
    """The HR image paths of one split, the layout they were found in, and the problems seen.

    lr_dirs maps a scale (2, 3, 4 ...) to a dataset-provided bicubic LR folder for this split,
    recognised but unused (we downscale ourselves). problems are one line each: files that were
    skipped because they might be images in a format we do not read, and empty splits. Files that
    claim to be PNG/JPEG but are not are caught later, by load_rgb. Paths are local Paths or
    StoragePaths, as the root was; those in `paths` come from a listing (their stat() is free).
    """

    split: str
    layout: str  # "div2k", "splits" (train/ val/ test/ folders) or "folder" (hash split)
    root: AnyPath  # the folder the HR images live in
    paths: list[AnyPath]
    lr_dirs: dict[int, AnyPath] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)


def find_images(root: AnyPath | str, split: str) -> ImageListing:
    """The HR images of `split` under `root` (a local folder or an object-store URI): a DIV2K tree,
    train/ val/ test/ folders, a Set5-style folder (HR/ used) or a plain folder (hash split); see the
    module docstring for the rules. Folders are listed, never probed name by name."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    root = input_path(root)
    if not root.is_dir():
        raise BadDataRoot(
            f"{root}: data root is not a folder; expected DIV2K_train_HR/ and DIV2K_valid_HR/ "
            "or a folder of PNG/JPEG images"
        )
    subdirs = _subdirs(root)
    if any(name in subdirs for name in _DIV2K_HR.values()):
        return _find_div2k(root, split, subdirs)
    split_dirs = _split_dirs(root, subdirs)
    if split_dirs is not None:
        return _find_split_dir(split_dirs[split], root, split)
    return _find_folder(root, split, subdirs)


def _subdirs(folder: AnyPath) -> dict[str, AnyPath]:
    """{name: path} of the folders directly in `folder`, from one listing ({} if there is none)."""
    try:
        return {p.name: p for p in folder.iterdir() if p.is_dir()}
    except (FileNotFoundError, NotADirectoryError):
        return {}


def list_image_files(folder: AnyPath, known_dirs: tuple[str, ...] = ()) -> tuple[list[AnyPath], list[str]]:
    """PNG/JPEG files directly in `folder` (sorted by name) and one line per suspicious other file,
    per subfolder that is not read (other than `known_dirs`, which the layout reads) and for the
    hidden files skipped, so nothing is left out unsaid."""
    images, problems, hidden = [], [], []
    for path in sorted(folder.iterdir()):
        if path.name.startswith("."):
            hidden.append(path.name)
        elif path.is_dir():
            if path.name not in known_dirs and not _SCALE_DIR.match(path.name):
                problems.append(f"{path}: a subfolder, not read (images are read directly in {folder})")
        elif path.suffix.lower() in IMAGE_SUFFIXES:
            images.append(path)
        elif path.suffix.lower() not in _NOT_IMAGES and path.name not in ("Thumbs.db", "desc.ini"):
            problems.append(f"{path}: skipped, not a .png/.jpg/.jpeg file; convert it to PNG to use it")
    if hidden:
        problems.append(f"{folder}: {len(hidden)} hidden file(s) or folder(s) skipped: {', '.join(hidden[:5])}"
                        + (" ..." if len(hidden) > 5 else ""))
    return images, problems


def _lr_dirs(folder: AnyPath | None) -> dict[int, AnyPath]:
    """{scale: folder} for subfolders named X2, X3, X4 (DIV2K and Set5 both use this naming)."""
    if folder is None:
        return {}
    found = {}
    for name, sub in sorted(_subdirs(folder).items()):
        match = _SCALE_DIR.match(name)
        if match:
            found[int(match.group(1))] = sub
    return found


def _find_div2k(root: AnyPath, split: str, subdirs: dict[str, AnyPath]) -> ImageListing:
    """train = DIV2K_train_HR; val/test = first/second half of DIV2K_valid_HR by name."""
    if _DIV2K_HR["valid"] not in subdirs and _DIV2K_HR["train"] in subdirs:
        return _find_folder(root / _DIV2K_HR["train"], split, {}, layout="div2k",
                            note=f"{root / _DIV2K_HR['valid']} is missing: the images of {_DIV2K_HR['train']} are "
                                 "split 60/20/20 into train/val/test by a hash of their names")
    part = "train" if split == "train" else "valid"
    hr = root / _DIV2K_HR[part]
    problems: list[str] = []
    if _DIV2K_HR[part] in subdirs:
        paths, problems = list_image_files(subdirs[_DIV2K_HR[part]])
    else:
        paths = []
    if part == "valid":
        half = math.ceil(len(paths) / 2)
        paths = paths[:half] if split == "val" else paths[half:]
        problems = problems if split == "val" else []  # report DIV2K_valid_HR's strays once
    if not paths:
        problems.append(f"{hr}: no HR images for split {split!r} (DIV2K {split} comes from {hr.name})")
    return ImageListing(
        split=split,
        layout="div2k",
        root=hr,
        paths=paths,
        lr_dirs=_lr_dirs(subdirs.get(_DIV2K_LR[part])),
        problems=problems,
    )


def _split_dirs(root: AnyPath, subdirs: dict[str, AnyPath]) -> dict[str, AnyPath | None] | None:
    """{split: folder or None} when root holds train/ and val/ (or valid/) or test/ folders."""
    found = {
        split: next((subdirs[name] for name in names if name in subdirs), None)
        for split, names in _SPLIT_DIRS.items()
    }
    if found["train"] is None or (found["val"] is None and found["test"] is None):
        return None
    return found


def _find_split_dir(folder: AnyPath | None, root: AnyPath, split: str) -> ImageListing:
    """One split folder (or its HR/ subfolder) taken whole."""
    if folder is None:
        return ImageListing(
            split=split, layout="splits", root=root, paths=[],
            problems=[f"{root}: no {' or '.join(_SPLIT_DIRS[split])}/ folder for split {split!r}"],
        )
    subdirs = _subdirs(folder)
    hr = subdirs.get("HR", folder)
    paths, problems = list_image_files(hr, ("HR",))
    if hr != folder:
        problems += _beside_hr(folder)
    if not paths:
        problems.append(f"{hr}: no .png/.jpg/.jpeg images for split {split!r}")
    lr_dirs = _lr_dirs(folder) if hr != folder else {}
    return ImageListing(split=split, layout="splits", root=hr, paths=paths, lr_dirs=lr_dirs, problems=problems)


def _find_folder(root: AnyPath, split: str, subdirs: dict[str, AnyPath], layout: str = "folder",
                 note: str | None = None) -> ImageListing:
    """A plain folder (or its HR/ subfolder) split 60/20/20 by a hash of each file name. The
    folder's problems (and `note`) are reported with the train split only: every split lists the
    same folder, and each stray file is named once."""
    hr = subdirs.get("HR", root)
    images, problems = list_image_files(hr, ("HR",))
    if hr != root:
        problems += _beside_hr(root)
    problems = ([note] if note else []) + problems if split == "train" else []
    if not images:
        raise BadDataRoot(
            f"{hr}: no .png/.jpg/.jpeg images found; expected DIV2K_train_HR/ and DIV2K_valid_HR/, "
            "an HR/ folder, or a folder of images"
        )
    paths = _hash_split(images)[split]
    if not paths:
        problems.append(
            f"{hr}: split {split!r} is empty ({len(images)} images; >= 3 give every split one)"
        )
    return ImageListing(
        split=split,
        layout=layout,
        root=hr,
        paths=paths,
        lr_dirs=_lr_dirs(root) if hr != root else {},
        problems=problems,
    )


def _beside_hr(folder: AnyPath) -> list[str]:
    """One line when images lie beside an HR/ folder: only HR/ is the HR set, they are not read."""
    beside, _ = list_image_files(folder, ("HR",))
    if not beside:
        return []
    names = ", ".join(p.name for p in beside[:5]) + (" ..." if len(beside) > 5 else "")
    return [f"{folder}: {len(beside)} image(s) beside HR/ not read (the HR images are those in HR/): {names}"]


def _name_hash(name: str) -> float:
    """A stable number in [0, 1) from a file name (sha1, so it is the same on every machine)."""
    return int.from_bytes(hashlib.sha1(name.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _hash_split(images: list[AnyPath]) -> dict[str, list[AnyPath]]:
    """Assign each file to train/val/test by where its name hash falls (60/20/20).

    Repair when there are >= 3 files and a split came out empty: it takes, from the currently
    largest split, the file whose hash lies closest to the empty split's band. The largest split
    has >= 2 files whenever another one is empty, so no split is emptied by the repair.
    """
    bands, start = {}, 0.0
    for split in SPLITS:
        bands[split] = (start, start + HASH_FRACTIONS[split])
        start += HASH_FRACTIONS[split]
    hashed = {path: _name_hash(path.name) for path in images}
    out: dict[str, list[AnyPath]] = {split: [] for split in SPLITS}
    for path, h in hashed.items():
        split = next((s for s in SPLITS if h < bands[s][1]), SPLITS[-1])
        out[split].append(path)
    if len(images) >= len(SPLITS):
        for split in SPLITS:
            if out[split]:
                continue
            donor = max(SPLITS, key=lambda s: (len(out[s]), -SPLITS.index(s)))
            lo, hi = bands[split]
            moved = min(out[donor], key=lambda p: min(abs(hashed[p] - lo), abs(hashed[p] - hi)))
            out[donor].remove(moved)
            out[split].append(moved)
    return {split: sorted(paths) for split, paths in out.items()}


def load_rgb(path: AnyPath | str, min_side: int = MIN_SIDE) -> np.ndarray:
    """Read an image file (a local Path, a StoragePath or its text) and decode it to (H, W, 3)
    uint8 RGB. A file this node cannot read raises tasks.UnreadableInput (naming the file and the
    node); one that is read but cannot be used raises BadImage naming the file.

    Conversions as tasks/images.py (16-bit grayscale scaled, alpha over black, MPO's first
    picture), and JPEG EXIF orientation is applied. Truncated files raise: we call img.load() and
    never enable PIL's LOAD_TRUNCATED_IMAGES.
    """
    path = input_path(path)
    data = read_input(path)  # UnreadableInput: a worker that cannot read it is not a corrupt file
    try:
        with Image.open(io.BytesIO(data)) as img:
            img.load()  # decode now: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)
            rgb = to_rgb(img)
    except Exception as err:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError, zlib.error...
        reason = _BYTES_REPR.sub("", " ".join(str(err).split())) or type(err).__name__
        raise BadImage(f"{path}: not a readable PNG/JPEG image ({reason})") from err
    height, width = rgb.shape[:2]
    if height < min_side or width < min_side:
        raise BadImage(
            f"{path}: {width}x{height} image is smaller than one {min_side}x{min_side} patch; "
            "use a larger image"
        )
    return rgb

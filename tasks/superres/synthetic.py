"""The embedded default data of the super-resolution task, with no network: the photographs
inside scikit-image's wheel plus seeded procedural images whose 64x64 patches range from flat
to densely textured, so patches genuinely differ in how much resolution they need.

Photograph split, by image (both motorcycle views stay in train: they are the same scene), each
split mixing smooth and textured content:
  train: astronaut, coffee, motorcycle_left, motorcycle_right, brick, gravel, retina, moon,
         coins, page, cell
  val:   chelsea (fur, smooth background), grass (texture), hubble_deep_field (mostly flat),
         clock (smooth, sharp edges)
  test:  camera (sky, grass, edges), rocket (sky, structure), immunohistochemistry (texture),
         text (glyph edges on smooth ground)
Every one of these ships in the wheel (skimage/data/); each is loaded in a try/except and one
that fails to load is left out (available_photos() says which loaded).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from tasks.superres.patches import PATCH

__all__ = [
    "PHOTO_SPLITS",
    "REGION_KINDS",
    "available_photos",
    "load_photo",
    "fill_region",
    "procedural_image",
    "embedded_images",
    "write_png_folder",
    "write_div2k_tree",
]

SPLITS = ("train", "val", "test")
PHOTO_SPLITS: dict[str, tuple[str, ...]] = {
    "train": (
        "astronaut", "coffee", "motorcycle_left", "motorcycle_right", "brick", "gravel",
        "retina", "moon", "coins", "page", "cell",
    ),
    "val": ("chelsea", "grass", "hubble_deep_field", "clock"),
    "test": ("camera", "rocket", "immunohistochemistry", "text"),
}
# name -> (file inside skimage/data/, loader). Checking the file first means we never reach
# skimage's download path (pooch), which would need the network, or skip a test under pytest.
_PHOTO_FILES: dict[str, tuple[str, str]] = {
    "astronaut": ("astronaut.png", "astronaut"),
    "brick": ("brick.png", "brick"),
    "camera": ("camera.png", "camera"),
    "cell": ("cell.png", "cell"),
    "chelsea": ("chelsea.png", "chelsea"),
    "clock": ("clock_motion.png", "clock"),
    "coffee": ("coffee.png", "coffee"),
    "coins": ("coins.png", "coins"),
    "grass": ("grass.png", "grass"),
    "gravel": ("gravel.png", "gravel"),
    "hubble_deep_field": ("hubble_deep_field.jpg", "hubble_deep_field"),
    "immunohistochemistry": ("ihc.png", "immunohistochemistry"),
    "moon": ("moon.png", "moon"),
    "motorcycle_left": ("motorcycle_left.png", "stereo_motorcycle"),
    "motorcycle_right": ("motorcycle_right.png", "stereo_motorcycle"),
    "page": ("page.png", "page"),
    "retina": ("retina.jpg", "retina"),
    "rocket": ("rocket.jpg", "rocket"),
    "text": ("text.png", "text"),
}


# -- photographs ------------------------------------------------------------------------------


def load_photo(name: str) -> np.ndarray | None:
    """(H, W, 3) uint8 of one scikit-image photograph, or None if it does not load offline."""
    import skimage.data  # lazy: importing scikit-image costs ~0.3 s

    filename, loader = _PHOTO_FILES[name]
    if not (Path(skimage.data.__file__).parent / filename).is_file():
        return None
    try:
        img = getattr(skimage.data, loader)()
    except Exception:  # noqa: BLE001 - any failure means "not available here"; callers list what loaded
        return None
    if loader == "stereo_motorcycle":
        img = img[0] if name == "motorcycle_left" else img[1]
    img = np.asarray(img)
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)  # grayscale photo -> (H, W, 3)
    return np.ascontiguousarray(img[:, :, :3], dtype=np.uint8)


def available_photos() -> dict[str, list[str]]:
    """{split: names} of the photographs that actually load here."""
    return {s: [n for n in names if load_photo(n) is not None] for s, names in PHOTO_SPLITS.items()}


def _fit(img: np.ndarray, scale: float, max_side: int | None, size: int = PATCH) -> np.ndarray:
    """Resize by `scale` (and down to max_side), then centre-crop both sides to multiples of `size`.

    Resizing rather than cropping keeps an image's whole mix of flat and textured regions. The
    factor never makes the short side smaller than one patch.
    """
    height, width = img.shape[:2]
    factor = scale
    if max_side is not None and max(height, width) * factor > max_side:
        factor = max_side / max(height, width)
    factor = max(factor, size / min(height, width))
    if abs(factor - 1.0) > 1e-9:
        new = (max(size, round(width * factor)), max(size, round(height * factor)))
        img = np.asarray(Image.fromarray(img).resize(new, Image.Resampling.LANCZOS))
        height, width = img.shape[:2]
    h, w = height // size * size, width // size * size
    top, left = (height - h) // 2, (width - w) // 2
    return np.ascontiguousarray(img[top : top + h, left : left + w])


# -- procedural images ------------------------------------------------------------------------


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(20, 235, size=3)


def _flat(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A flat colour with faint sensor-like noise: x4 reconstructs it as well as x2."""
    return _colour(rng) + rng.normal(0, rng.uniform(0, 1.5), size=(h, w, 3))


def _axes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """(h, w) coordinate along a random direction, in pixels."""
    theta = rng.uniform(0, np.pi)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    return xx * np.cos(theta) + yy * np.sin(theta)


def _gradient(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A linear ramp between two colours in a random direction."""
    t = _axes(rng, h, w)
    t = (t - t.min()) / max(np.ptp(t), 1e-9)  # (h, w) in [0, 1]
    return _colour(rng) * (1 - t[:, :, None]) + _colour(rng) * t[:, :, None]


def _lowfreq(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A low-frequency sinusoid (period 48-160 px): smooth, bicubic-friendly at every scale."""
    wave = np.sin(2 * np.pi * _axes(rng, h, w) / rng.uniform(48, 160) + rng.uniform(0, 2 * np.pi))
    return _colour(rng) + rng.uniform(20, 60) * wave[:, :, None] * rng.uniform(0.3, 1.0, size=3)


def _stripes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """High-frequency stripes, period 4-9 px: resolvable from x2 LR, aliased or lost at x4."""
    wave = np.sin(2 * np.pi * _axes(rng, h, w) / rng.uniform(4, 9) + rng.uniform(0, 2 * np.pi))
    a, b = _colour(rng), _colour(rng)
    return (a + b) / 2 + (a - b)[None, None, :] / 2 * wave[:, :, None]


def _noise(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Dense colour noise, slightly blurred (grain of 1-2 px)."""
    noise = np.clip(_colour(rng) + rng.normal(0, rng.uniform(25, 60), size=(h, w, 3)), 0, 255)
    img = Image.fromarray(noise.astype(np.uint8)).filter(ImageFilter.GaussianBlur(rng.uniform(0.4, 1.2)))
    return np.asarray(img, dtype=np.float64)


def _grain(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Pixel grain (sensor noise in the dark, film grain): independent per pixel, so it lies
    beyond the Nyquist limit of every LR input and no expert recovers any of it. It looks the
    busiest of all to a gradient measure yet gains nothing from more data: inputs that a
    texture heuristic sends to the dearest expert for nothing, and a learned gate need not."""
    return _colour(rng) + rng.normal(0, rng.uniform(12, 40), size=(h, w, 3))


def _checker(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A fine checkerboard (cells of 3-8 px): sharp edges everywhere."""
    cell = int(rng.integers(3, 9))
    yy, xx = np.mgrid[0:h, 0:w]
    board = ((yy // cell + xx // cell) % 2).astype(np.float64)[:, :, None]
    return _colour(rng) * board + _colour(rng) * (1 - board)


def _draw(rng: np.random.Generator, h: int, w: int, paint: Callable[[ImageDraw.ImageDraw], None]) -> np.ndarray:
    """A flat background with `paint` applied by PIL (aliased, so edges stay sharp)."""
    img = Image.new("RGB", (w, h), tuple(int(v) for v in _colour(rng)))
    paint(ImageDraw.Draw(img))
    return np.asarray(img, dtype=np.float64)


def _shapes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A few flat shapes (ellipses, rectangles, triangles) with sharp edges."""

    def paint(draw: ImageDraw.ImageDraw) -> None:
        for _ in range(int(rng.integers(2, 7))):
            fill = tuple(int(v) for v in _colour(rng))
            x0, x1 = sorted(rng.uniform(-w / 4, 1.25 * w, size=2))
            y0, y1 = sorted(rng.uniform(-h / 4, 1.25 * h, size=2))
            kind = rng.integers(3)
            if kind == 0:
                draw.ellipse((x0, y0, x1, y1), fill=fill)
            elif kind == 1:
                draw.rectangle((x0, y0, x1, y1), fill=fill)
            else:
                draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=fill)

    return _draw(rng, h, w, paint)


def _glyphs(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Rows of text-like glyphs: 2-4 random strokes (1-2 px wide) on a 3x3 lattice per 8-15 px cell."""
    cell = int(rng.integers(8, 16))
    stroke = int(rng.integers(1, 3))

    def paint(draw: ImageDraw.ImageDraw) -> None:
        ink = tuple(int(v) for v in rng.uniform(0, 80, size=3))
        lattice = np.linspace(1, cell - 2, 3)
        for top in range(1, h - cell, cell + 2):
            for left in range(1, w - cell, cell):
                if rng.random() < 0.15:
                    continue  # a space between words
                for _ in range(int(rng.integers(2, 5))):
                    (ay, ax), (by, bx) = rng.choice(lattice, size=(2, 2))
                    draw.line((left + ax, top + ay, left + bx, top + by), fill=ink, width=stroke)

    return _draw(rng, h, w, paint)


_FILLERS: dict[str, Callable[[np.random.Generator, int, int], np.ndarray]] = {
    "flat": _flat,
    "gradient": _gradient,
    "lowfreq": _lowfreq,
    "shapes": _shapes,
    "stripes": _stripes,
    "noise": _noise,
    "grain": _grain,
    "checker": _checker,
    "glyphs": _glyphs,
}
REGION_KINDS = tuple(_FILLERS)  # smooth first, textured last
_KIND_P = np.array([0.18, 0.12, 0.12, 0.14, 0.10, 0.08, 0.10, 0.06, 0.10])  # about half smooth


def fill_region(kind: str, rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """(height, width, 3) uint8 filled with one content kind (see REGION_KINDS)."""
    return np.clip(np.rint(_FILLERS[kind](rng, height, width)), 0, 255).astype(np.uint8)


def _partition(rng: np.random.Generator, box: tuple[int, int, int, int], grid: int = 32) -> list:
    """Guillotine-split box (top, left, h, w) on a 32-px grid into leaves of 32-128 px sides.

    Three cuts in four fall on the 64-px patch grid, so many patches hold one kind of content;
    the rest do not, so some patches straddle two kinds with an edge between them.
    """
    top, left, h, w = box
    splittable = [axis for axis, side in ((0, h), (1, w)) if side >= 2 * grid]
    must = max(h, w) > 4 * grid
    if not splittable or (not must and rng.random() > 0.35):
        return [box]
    axis = 0 if must and h >= w else 1 if must else int(rng.choice(splittable))
    side = h if axis == 0 else w
    if side >= 4 * grid and rng.random() < 0.75:
        cut = int(rng.integers(1, side // (2 * grid))) * 2 * grid  # on the patch grid
    else:
        cut = int(rng.integers(1, side // grid)) * grid
    if axis == 0:
        parts = [(top, left, cut, w), (top + cut, left, h - cut, w)]
    else:
        parts = [(top, left, h, cut), (top, left + cut, h, w - cut)]
    return [leaf for part in parts for leaf in _partition(rng, part, grid)]


def procedural_image(rng: np.random.Generator, height: int = 256, width: int = 256) -> np.ndarray:
    """(height, width, 3) uint8 canvas of rectangular regions, each flat, gradient, low-frequency
    wave, sharp shapes, stripes, noise, grain, checkerboard or glyphs."""
    canvas = np.zeros((height, width, 3), dtype=np.uint8)
    for top, left, h, w in _partition(rng, (0, 0, height, width)):
        kind = REGION_KINDS[int(rng.choice(len(REGION_KINDS), p=_KIND_P))]
        canvas[top : top + h, left : left + w] = fill_region(kind, rng, h, w)
    return canvas


# -- the data set ------------------------------------------------------------------------------


def embedded_images(
    split: str,
    scale: float = 1.0,
    n_procedural: int = 8,
    seed: int = 0,
    max_side: int | None = None,
    procedural_side: int = 256,
) -> list[tuple[str, np.ndarray]]:
    """The embedded images of `split` as (image_id, (H, W, 3) uint8), sides multiples of 64.

    Args:
        scale: resize factor for the photographs (1.0: native, 0.5: a quarter of the patches).
        n_procedural: procedural images in this split; image i of a split is the same whatever
            n_procedural is (seeded by seed, split, i).
        max_side: cap on the longer side of every image (photos are resized down to it,
            procedural ones drawn at most this big), to bound the patch count of smoke/demo runs.
        procedural_side: side of the square procedural images before max_side.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(SPLITS)}")
    images = []
    for name in PHOTO_SPLITS[split]:
        photo = load_photo(name)
        if photo is not None:
            images.append((f"skimage-{name}", _fit(photo, scale, max_side)))
    side = procedural_side if max_side is None else min(procedural_side, max_side)
    side = max(PATCH, side // PATCH * PATCH)
    for i in range(n_procedural):
        rng = np.random.default_rng([seed, SPLITS.index(split), i])
        images.append((f"procedural-{split}-{i:03d}", procedural_image(rng, side, side)))
    return images


def write_png_folder(images: Sequence[tuple[str, np.ndarray]], folder: Path) -> list[Path]:
    """Write (image_id, HxWx3 uint8) pairs as <folder>/<image_id>.png; return the paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for image_id, img in images:
        path = folder / f"{image_id}.png"
        Image.fromarray(img).save(path, format="PNG")
        paths.append(path)
    return paths


def write_div2k_tree(root: Path, splits: dict[str, Sequence[tuple[str, np.ndarray]]]) -> Path:
    """Write train/val/test images in DIV2K's layout so readers.find_images gives back the same split.

    train -> DIV2K_train_HR/0001_<id>.png ...; val then test -> DIV2K_valid_HR/0801_<id>.png ...
    (the reader's rule: val = first ceil(n/2) of DIV2K_valid_HR by name, test = the rest), which
    needs len(val) == len(test) or len(val) == len(test) + 1.
    """
    n_val, n_test = len(splits["val"]), len(splits["test"])
    if n_val - n_test not in (0, 1):
        raise ValueError(f"DIV2K layout halves its valid set: val ({n_val}) and test ({n_test}) must match")
    root = Path(root)
    train = [(f"{i + 1:04d}_{image_id}", img) for i, (image_id, img) in enumerate(splits["train"])]
    valid = [*splits["val"], *splits["test"]]
    valid = [(f"{i + 801:04d}_{image_id}", img) for i, (image_id, img) in enumerate(valid)]
    write_png_folder(train, root / "DIV2K_train_HR")
    write_png_folder(valid, root / "DIV2K_valid_HR")
    return root

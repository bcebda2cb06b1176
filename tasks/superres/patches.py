"""The P_n of the super-resolution task: cut an image into 64x64 patches on a fixed grid and
make each patch's bicubic low-resolution version, the only thing that crosses the network.

Sizes: the LR side of a `patch`-pixel patch at scale S is round(patch / S), half rounded up:
64 -> 32 (x2), 21 (x3, 64/3 = 21.33), 16 (x4). The paper's data cost d_n = (64/S)^2 * 3 * K
(data_cost_bytes) is kept as the reported cost; sent_values / sent_bytes give the element count
actually transmitted (21 * 21 * 3 at x3, not 21.33^2 * 3).
"""

from __future__ import annotations

import io
import math

import numpy as np
from PIL import Image

__all__ = [
    "PATCH",
    "SCALES",
    "to_patches",
    "from_patches",
    "lr_side",
    "downscale",
    "upscale_bicubic",
    "png_bytes",
    "data_cost_bytes",
    "sent_values",
    "sent_bytes",
]

PATCH = 64  # the paper's fixed grid (section IV-C)
SCALES = (4, 3, 2)  # experts in the paper's order: cheapest first


def to_patches(img: np.ndarray, size: int = PATCH) -> tuple[np.ndarray, np.ndarray]:
    """Non-overlapping size x size patches in row-major order; the right/bottom remainder is cropped.

    Returns (patches (P, size, size, 3) same dtype as img, positions (P, 2) int64 (row, col) of
    each patch's top-left pixel).
    """
    height, width = img.shape[:2]
    rows, cols = height // size, width // size
    grid = img[: rows * size, : cols * size]  # (rows*size, cols*size, C)
    channels = img.shape[2:]
    patches = grid.reshape(rows, size, cols, size, *channels).swapaxes(1, 2)  # (rows, cols, s, s, C)
    patches = np.ascontiguousarray(patches.reshape(rows * cols, size, size, *channels))
    r, c = np.meshgrid(np.arange(rows) * size, np.arange(cols) * size, indexing="ij")
    positions = np.stack([r.ravel(), c.ravel()], axis=1).astype(np.int64)  # (P, 2)
    return patches, positions


def from_patches(patches: np.ndarray, positions: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Reassemble patches (P, s, s, C) at positions (P, 2) into an image of shape (H, W[, C]).

    Pixels no patch covers (the cropped remainder) are 0.
    """
    height, width = shape[:2]
    size = patches.shape[1]
    out = np.zeros((height, width, *patches.shape[3:]), dtype=patches.dtype)  # (H, W, C)
    for patch, (row, col) in zip(patches, positions):
        out[row : row + size, col : col + size] = patch
    return out


def lr_side(scale: int, patch: int = PATCH) -> int:
    """round(patch / scale) with halves rounded up (not Python's round-half-even): 64 -> 32/21/16."""
    return int(math.floor(patch / scale + 0.5))


def _resize(arr: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """One (h, w, 3) uint8 image resized to size = (height, width) with PIL bicubic."""
    # PIL's bicubic (a = -0.5) widens its kernel when shrinking, i.e. it antialiases like
    # MATLAB's imresize, the usual way SR benchmarks make their LR images.
    out = Image.fromarray(arr).resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(out, dtype=np.uint8)


def downscale(x: np.ndarray, scale: int) -> np.ndarray:
    """Bicubic LR version of one patch (h, w, 3) or a batch (B, h, w, 3), uint8 in and out.

    Each patch is downscaled on its own, as a sensor would send it: (B, lr_side(h), lr_side(w), 3).
    """
    if scale < 1:
        raise ValueError(f"scale must be >= 1, got {scale}")
    batch = x[None] if x.ndim == 3 else x  # (B, h, w, 3)
    size = (lr_side(scale, batch.shape[1]), lr_side(scale, batch.shape[2]))
    out = np.stack([_resize(np.ascontiguousarray(p), size) for p in batch])  # (B, lh, lw, 3)
    return out[0] if x.ndim == 3 else out


def upscale_bicubic(x: np.ndarray, size: int = PATCH) -> np.ndarray:
    """The bicubic baseline: LR (h, w, 3) or (B, h, w, 3) uint8 back to size x size, uint8."""
    batch = x[None] if x.ndim == 3 else x  # (B, h, w, 3)
    out = np.stack([_resize(np.ascontiguousarray(p), (size, size)) for p in batch])  # (B, s, s, 3)
    return out[0] if x.ndim == 3 else out


def png_bytes(arr: np.ndarray) -> int:
    """Bytes of the lossless PNG encoding of a uint8 (h, w[, 3]) array: what really crosses a network."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(arr, dtype=np.uint8)).save(buffer, format="PNG", compress_level=6)
    return buffer.tell()


def data_cost_bytes(scale: float, K: int = 4, patch: int = PATCH) -> float:  # noqa: N803 - the paper's K
    """The paper's d_n = (patch / S)^2 * 3 * K bytes (K bytes per value; 4 = float32)."""
    return (patch / scale) ** 2 * 3 * K


def sent_values(scale: int, patch: int = PATCH) -> int:
    """Values actually sent for one patch at scale S: lr_side^2 * 3 (1,323 at x3, not 1,365.3)."""
    return lr_side(scale, patch) ** 2 * 3


def sent_bytes(scale: int, K: int = 4, patch: int = PATCH) -> int:  # noqa: N803
    """sent_values * K: the exact byte count of the transmitted LR patch at K bytes per value."""
    return sent_values(scale, patch) * K

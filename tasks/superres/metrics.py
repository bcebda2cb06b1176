"""PSNR the way super-resolution papers report it, made additive for routing.

Convention (state it in every report): PSNR on the Y channel of BT.601 YCbCr (MATLAB rgb2ycbcr),
SR clipped to [0, 255], pixels within S pixels of the *image* border excluded. RGB PSNR is kept
as a secondary number.

PSNR is not additive over patches, so per patch we keep the squared-error sum and the pixel
count; an image's PSNR pools them over its patches (each from whichever expert the gate chose)
before the log, and the reported figure is the mean of image PSNRs (DESIGN.md section 2).
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = [
    "PSNR_CAP_DB",
    "PatchErrors",
    "rgb_to_y",
    "border_mask",
    "patch_errors",
    "image_psnr",
    "per_image_psnr",
    "mean_image_psnr",
]

PSNR_CAP_DB = 100.0  # a perfect reconstruction (sse = 0) scores this instead of +inf


class PatchErrors(NamedTuple):
    """Per-patch pooled error terms, each (P,): sums of squared errors in [0, 255] units and the
    number of values they sum over (pixels for Y, pixels x 3 for RGB)."""

    sse_y: np.ndarray
    count_y: np.ndarray
    sse_rgb: np.ndarray
    count_rgb: np.ndarray


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Luma Y in [16, 235] from RGB in [0, 255], shape (..., 3) -> (...): BT.601 as MATLAB rgb2ycbcr."""
    rgb = np.asarray(img, dtype=np.float64)
    return 16.0 + (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 255.0


def border_mask(positions: np.ndarray, shape: tuple[int, ...], scale: int, size: int) -> np.ndarray:
    """(P, size, size) bool: True where a patch pixel lies at least `scale` pixels inside the image.

    shape is (H, W[, C]) of the image the patches tile; the border is the image's, not the patch's.
    """
    height, width = shape[:2]
    offsets = np.arange(size)
    rows = positions[:, 0:1] + offsets  # (P, size) image row of each patch row
    cols = positions[:, 1:2] + offsets  # (P, size)
    row_ok = (rows >= scale) & (rows < height - scale)
    col_ok = (cols >= scale) & (cols < width - scale)
    return row_ok[:, :, None] & col_ok[:, None, :]  # (P, size, size)


def patch_errors(
    sr: np.ndarray, hr: np.ndarray, positions: np.ndarray, shape: tuple[int, ...], scale: int
) -> PatchErrors:
    """Per-patch (sse_y, count_y, sse_rgb, count_rgb) of SR (P, s, s, 3) against HR (P, s, s, 3).

    Both in [0, 255] (any dtype); SR is clipped to [0, 255] first. positions (P, 2) are the patches'
    (row, col) in the image of shape (H, W); pixels within `scale` pixels of that image's border
    are left out of both sums and counts.
    """
    sr = np.clip(np.asarray(sr, dtype=np.float64), 0.0, 255.0)  # (P, s, s, 3)
    hr = np.asarray(hr, dtype=np.float64)  # (P, s, s, 3)
    mask = border_mask(np.asarray(positions), shape, scale, hr.shape[1])  # (P, s, s)
    err_y = (rgb_to_y(sr) - rgb_to_y(hr)) ** 2  # (P, s, s)
    err_rgb = ((sr - hr) ** 2).sum(axis=-1)  # (P, s, s)
    count = mask.sum(axis=(1, 2)).astype(np.int64)  # (P,)
    return PatchErrors(
        sse_y=(err_y * mask).sum(axis=(1, 2)),
        count_y=count,
        sse_rgb=(err_rgb * mask).sum(axis=(1, 2)),
        count_rgb=count * 3,
    )


def image_psnr(
    sse: np.ndarray | float, count: np.ndarray | int, cap: float = PSNR_CAP_DB
) -> float | np.ndarray:
    """10 log10(255^2 * count / sse) dB, elementwise; sse = 0 (or a tinier error) gives `cap`.

    count = 0 (nothing measured) gives NaN.
    """
    sse = np.asarray(sse, dtype=np.float64)
    count = np.asarray(count, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        psnr = 10.0 * np.log10(255.0**2 * count / sse)
    psnr = np.where(count > 0, np.minimum(psnr, cap), np.nan)
    return float(psnr) if psnr.ndim == 0 else psnr


def per_image_psnr(image_ids: np.ndarray, sse: np.ndarray, count: np.ndarray) -> dict[str, float]:
    """{image_id: PSNR} with each image's patch sse and count pooled before the log."""
    ids = np.asarray(image_ids)
    uniq, inverse = np.unique(ids, return_inverse=True)
    sse_sum = np.bincount(inverse, weights=np.asarray(sse, dtype=np.float64), minlength=len(uniq))
    count_sum = np.bincount(inverse, weights=np.asarray(count, dtype=np.float64), minlength=len(uniq))
    psnr = np.atleast_1d(image_psnr(sse_sum, count_sum))
    return {str(u): float(p) for u, p in zip(uniq, psnr)}


def mean_image_psnr(image_ids: np.ndarray, sse: np.ndarray, count: np.ndarray) -> float:
    """The reported figure: PSNR per image (patches pooled), averaged over images."""
    return float(np.mean(list(per_image_psnr(image_ids, sse, count).values())))

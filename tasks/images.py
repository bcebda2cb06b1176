"""Decoding still images the one way training and serving share, for every image task: whatever
mode a PNG/JPEG holds becomes (H, W, 3) uint8 RGB by the same rules, so a served image is
decoded exactly as its training copy was.

Conventions: grayscale and bilevel are replicated to 3 channels; palette images are expanded;
alpha (RGBA, LA, palette transparency) is composited over black, i.e. RGB * alpha / 255, so
hidden colours under transparent pixels never leak in; 16-bit grayscale is scaled
round(v * 255 / 65535) (Pillow's own conversion clips it to 255: almost white); 16-bit RGB(A) is
reduced by Pillow to its high byte. An MPO file (a camera's multi-picture JPEG) is its first
picture, a plain JPEG.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tasks.base import BadInput

FORMATS = ("PNG", "JPEG", "MPO")  # MPO: read as its first picture
MAX_PIXELS = 64_000_000  # a request's decompression-bomb guard: about 8k x 8k
SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")


def to_rgb(img: Image.Image) -> np.ndarray:
    """(H, W, 3) uint8 from any decoded Pillow mode (the module's conventions)."""
    if img.mode in SIXTEEN_BIT:
        values = np.asarray(img, dtype=np.float64)  # (H, W) 16-bit range
        gray = np.clip(np.rint(values * 255.0 / 65535.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "PA", "La", "RGBa"):
        img = img.convert("RGBA")
    if img.mode == "RGBA":
        rgba = np.asarray(img, dtype=np.uint16)  # (H, W, 4)
        alpha = rgba[:, :, 3:4]
        return ((rgba[:, :, :3] * alpha + 127) // 255).astype(np.uint8)  # over black, rounded
    if img.mode != "RGB":
        img = img.convert("RGB")  # 1, L, CMYK, YCbCr ...
    return np.asarray(img, dtype=np.uint8).copy()


def decode_request_image(body: bytes) -> np.ndarray:
    """A request body's PNG/JPEG -> (H, W, 3) uint8, EXIF orientation applied as a viewer would;
    BadInput (one line) for anything else, an empty body, a truncated file or too many pixels."""
    if not body:
        raise BadInput("empty request body: POST the raw bytes of a PNG or JPEG image")
    try:
        with Image.open(io.BytesIO(body)) as img:
            if img.format not in FORMATS:
                raise BadInput(f"request body is a {img.format} image; expected PNG or JPEG")
            if img.width * img.height > MAX_PIXELS:
                raise BadInput(f"{img.width}x{img.height} image has more than {MAX_PIXELS} pixels")
            img.load()  # a truncated file fails here
            return to_rgb(ImageOps.exif_transpose(img))
    except BadInput:
        raise
    except Image.DecompressionBombError:  # past Pillow's own limit: refused before any pixel is decoded
        raise BadInput(f"request body's image has more than {MAX_PIXELS} pixels") from None
    except UnidentifiedImageError:
        raise BadInput(f"request body ({len(body)} bytes) is not a PNG or JPEG image") from None
    except Exception as err:  # noqa: BLE001 - Pillow raises OSError, SyntaxError, ValueError...
        reason = " ".join(str(err).split()) or type(err).__name__
        raise BadInput(f"request body is not a readable PNG/JPEG image ({reason})") from None

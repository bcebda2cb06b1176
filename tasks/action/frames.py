"""The spatial modality: F_s RGB frames read with decord, resized to H_s x W_s.

decord decodes at the clip's own size and Pillow resizes (area-averaging): decord 0.6's own
resizing fails at some output widths (48 px: 'DECORDArrayCopyFromTo: The size must exactly
match', measured here) and does not low-pass before subsampling.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class UnreadableFrames(ValueError):
    """A file decord cannot open or read frames from."""


def rgb_frames(path: Path, count: int, height: int, width: int) -> np.ndarray:
    """(count, height, width, 3) uint8 frames evenly spaced over the clip (one: its middle)."""
    import decord
    from PIL import Image

    try:
        reader = decord.VideoReader(str(path), num_threads=1)
        total = len(reader)
        if total == 0:
            raise UnreadableFrames(f"{path}: no frames")
        frames = reader.get_batch(frame_indices(total, count)).asnumpy()  # (count, H, W, 3)
    except (decord.DECORDError, RuntimeError) as err:  # decord raises plain RuntimeError on open
        raise UnreadableFrames(f"{path}: cannot read frames with decord ({str(err).splitlines()[0]})") from None
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for k, frame in enumerate(frames):
        image = Image.fromarray(frame)
        out[k] = np.asarray(image if image.size == (width, height) else image.resize((width, height), Image.BOX))
    return out


def frame_indices(total: int, count: int) -> list[int]:
    """`count` frame numbers evenly spaced over `total` frames, centred in their segments."""
    return [min(total - 1, int((k + 0.5) * total / count)) for k in range(count)]

"""The spatial modality: F_s RGB frames read with decord, resized to H_s x W_s.

decord decodes at the clip's own size and Pillow resizes (area-averaging): decord 0.6's own
resizing fails at some output widths (48 px: 'DECORDArrayCopyFromTo: The size must exactly
match', measured here) and does not low-pass before subsampling.

decord reads a local clip by its file name. A clip in an object store is decoded from a temporary
local copy of its bytes, deleted after: decord 0.6 does take a file object, but crashed the
process (SIGSEGV) on truncated AVI bytes that it reads from the file without complaint, and it
prints the raw bytes of an unreadable buffer to stderr (measured here; dmlc/decord issues 156, 299).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from storage import AnyPath
from tasks.inputs import input_path, read_input


class UnreadableFrames(ValueError):
    """A file decord cannot open or read frames from."""


def rgb_frames(path: AnyPath | str, count: int, height: int, width: int, data: bytes | None = None) -> np.ndarray:
    """(count, height, width, 3) uint8 frames evenly spaced over the clip (one: its middle).

    A local `path` is opened by name. Any other is decoded from its bytes, `data` when the caller
    has read them already, else read through `path` (tasks.UnreadableInput if this node cannot),
    written to a temporary file that is deleted after.
    """
    path = input_path(path)
    if isinstance(path, Path):
        return _decode(str(path), path, count, height, width)
    if data is None:
        data = read_input(path)
    with tempfile.TemporaryDirectory(prefix="bmoe-clip-") as folder:
        local = Path(folder) / (path.name or "clip")  # the name keeps the container's suffix
        local.write_bytes(data)
        return _decode(str(local), path, count, height, width)


def _decode(filename: str, path: AnyPath, count: int, height: int, width: int) -> np.ndarray:
    """rgb_frames from a local file `filename`; messages name `path`, the clip it holds."""
    import decord
    from PIL import Image

    try:
        reader = decord.VideoReader(filename, num_threads=1)
        total = len(reader)
        if total == 0:
            raise UnreadableFrames(f"{path}: no frames")
        frames = reader.get_batch(frame_indices(total, count)).asnumpy()  # (count, H, W, 3)
        del reader  # closes the file before a temporary copy is deleted
    except (decord.DECORDError, RuntimeError, AssertionError) as err:  # RuntimeError on open; 0 frames asserts
        reason = (str(err).splitlines() or [type(err).__name__])[0].replace(filename, str(path))
        raise UnreadableFrames(f"{path}: cannot read frames with decord ({reason})") from None
    out = np.empty((count, height, width, 3), dtype=np.uint8)
    for k, frame in enumerate(frames):
        image = Image.fromarray(frame)
        out[k] = np.asarray(image if image.size == (width, height) else image.resize((width, height), Image.BOX))
    return out


def frame_indices(total: int, count: int) -> list[int]:
    """`count` frame numbers evenly spaced over `total` frames, centred in their segments."""
    return [min(total - 1, int((k + 0.5) * total / count)) for k in range(count)]

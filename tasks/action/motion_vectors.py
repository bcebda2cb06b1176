"""The temporal modality: codec motion vectors, read from the bitstream with PyAV, never optical
flow. Each frame's vectors are rasterised onto a 24x24 grid of block-averaged (dx, dy).

FFmpeg exports one vector per inter-coded block (MOTION_VECTORS side data): the block's size
(w, h), its centre in this frame (dst_x, dst_y) and the displacement to its reference block,
motion = (src - dst) * motion_scale. `source` is -1 for a past reference and +1 for a future
one (B-frames), so the block's velocity in pixels per frame, forward in time, is
source * motion / motion_scale. Intra-coded frames carry no vectors and are skipped, so F_t
counts frames that carry motion; a clip with none at all is reported, never kept as zeros.

PyAV decodes the clip from its bytes in memory (av.open on a BytesIO), so a clip in an object
store is read once, through its path object, and never needs a local file; the vectors exported
are the same as from the file (checked on MPEG-4 part 2 and H.264, AVI and MP4).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from storage import AnyPath
from tasks.inputs import input_path, read_input

GRID = 24  # H_t = W_t = 24 (section IV-D)


class NoMotion(ValueError):
    """A clip that decodes but carries no motion vectors (all intra frames, or too short)."""


class Undecodable(ValueError):
    """A file PyAV cannot open or decode as video."""


def motion_grids(path: AnyPath | str, frames: int, grid: int = GRID, scale: float = 1.0,
                 data: bytes | None = None) -> np.ndarray:
    """(frames, grid, grid, 2) float32 velocities (dx, dy) in pixels per frame times `scale`,
    from the first `frames` frames that carry motion vectors; zero-padded if the clip has fewer.

    `data` is the clip's bytes when the caller has read them already (then `path` only names the
    clip in messages); otherwise they are read through `path` (tasks.UnreadableInput if this node
    cannot). Raises NoMotion when no frame carries vectors and Undecodable when the file is not video.
    """
    import av

    if data is None:
        data = read_input(input_path(path))
    out = np.zeros((frames, grid, grid, 2), dtype=np.float32)
    taken = 0
    try:
        with av.open(io.BytesIO(data)) as container:
            if not container.streams.video:
                raise Undecodable(f"{path}: no video stream")
            stream = container.streams.video[0]
            # must reach the decoder before the first packet; av.open(options=...) does not (STACK.md)
            stream.codec_context.options = {"flags2": "+export_mvs"}
            width, height = stream.codec_context.width, stream.codec_context.height
            for frame in container.decode(stream):
                vectors = frame.side_data.get("MOTION_VECTORS")
                if vectors is None:  # intra-coded frame: no motion in the bitstream
                    continue
                out[taken] = rasterise(vectors.to_ndarray(), width or frame.width, height or frame.height, grid)
                taken += 1
                if taken == frames:
                    break
    except (av.error.FFmpegError, UnicodeDecodeError) as err:
        reason = " ".join(str(getattr(err, "strerror", None) or err).split())  # FFmpeg's words, no errno
        raise Undecodable(f"{path}: cannot decode video ({reason})") from None
    if taken == 0:
        raise NoMotion(f"{path}: no motion vectors in the bitstream (all frames intra-coded?)")
    return out * np.float32(scale)


def rasterise(vectors: np.ndarray, width: int, height: int, grid: int = GRID) -> np.ndarray:
    """(grid, grid, 2) area-weighted mean velocity of the blocks covering each grid cell.

    Args:
        vectors: FFmpeg's AVMotionVector records (PyAV's structured array).
    Cells no inter block covers (intra blocks) stay zero.
    """
    if len(vectors) == 0:
        return np.zeros((grid, grid, 2), dtype=np.float32)
    scale = np.maximum(vectors["motion_scale"].astype(np.float64), 1.0)
    direction = np.sign(vectors["source"]).astype(np.float64)
    vel = np.stack([vectors["motion_x"] / scale, vectors["motion_y"] / scale], axis=1) * direction[:, None]  # (V, 2)
    # block extents in grid units: [x0, x1) x [y0, y1)
    half_w, half_h = vectors["w"] / 2.0, vectors["h"] / 2.0
    gx, gy = grid / float(width), grid / float(height)
    x0 = np.clip((vectors["dst_x"] - half_w) * gx, 0, grid)
    x1 = np.clip((vectors["dst_x"] + half_w) * gx, 0, grid)
    y0 = np.clip((vectors["dst_y"] - half_h) * gy, 0, grid)
    y1 = np.clip((vectors["dst_y"] + half_h) * gy, 0, grid)
    cells = np.arange(grid, dtype=np.float64)
    # (V, grid) overlap of each block with each column / row of cells; a block's overlap with
    # cell (i, j) is oy[v, i] * ox[v, j], so the sums over blocks are matrix products
    ox = np.clip(np.minimum(x1[:, None], cells + 1) - np.maximum(x0[:, None], cells), 0, None)
    oy = np.clip(np.minimum(y1[:, None], cells + 1) - np.maximum(y0[:, None], cells), 0, None)
    area = oy.T @ ox  # (grid, grid)
    sums = np.stack([(oy * vel[:, c:c + 1]).T @ ox for c in range(2)], axis=-1)  # (grid, grid, 2)
    return (sums / np.maximum(area, 1e-12)[:, :, None]).astype(np.float32)


def count_frames(path: Path, export_mvs: bool) -> int:
    """Decode every frame of `path` (with or without vector export); for the bench."""
    import av

    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        if export_mvs:
            stream.codec_context.options = {"flags2": "+export_mvs"}
        count = 0
        for frame in container.decode(stream):
            if export_mvs:
                frame.side_data.get("MOTION_VECTORS")
            count += 1
    return count

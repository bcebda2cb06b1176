"""The embedded default: short clips of moving shapes, encoded with a real codec (MPEG-4 part 2,
UCF-101's Xvid family) through PyAV so that their motion vectors are genuine codec output, and
written in UCF-101's layout with CRLF split lists, so the real reader is the one that runs.

The classes make routing matter (section IV-D): four share one look (a green square) and
differ only by the direction they slide in, so the temporal expert suffices for them and one
RGB frame cannot tell them apart; eight share one motion (a triangle shaking sideways) and
differ only by colour, so the motion vectors cannot tell them apart and the spatial or fusion
expert is needed. Eight colours, not four: on the shaking clips the temporal expert is right
by luck one time in eight, and the oracle's gain from knowing those lucky clips (which no gate
that sees only motion can know) shrinks beside the gain from knowing the motion (a router told
each clip's motion reached 0.48-0.58 of the oracle's gain with four colours on the demo,
measured; with two idle and two shaking pairs, 0.41). With two thirds of the clips shaking,
the spatial expert (right on them) beats the temporal one, so the LP mixes all three experts.
A slow camera pan in some clips adds the global motion that makes real
motion vectors noisy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tasks.action.readers import CLASS_INDEX, LIST_DIR, VIDEO_DIR

GREEN = (60, 200, 70)
# The shaking triangles' colours have one luma (Y = 0.299 R + 0.587 G + 0.114 B, about 100):
# the codec's block matching sees luma only, so their motion vectors carry no trace of colour
# (with a bright yellow among them, the temporal expert told it apart 85 % of the time).
RED, BLUE, MAGENTA, TEAL = (220, 50, 40), (70, 90, 255), (200, 40, 200), (20, 125, 160)
ORANGE, YELLOW, LEAF, PURPLE = (168, 84, 0), (113, 113, 0), (45, 138, 40), (140, 50, 235)


@dataclass(frozen=True)
class SynthClass:
    name: str  # CamelCase, as UCF-101's class folders
    shape: str  # square | disc | triangle
    colour: tuple[int, int, int]
    motion: str  # right | left | up | down | orbit | idle | shake


CLASSES = (
    SynthClass("SlideRight", "square", GREEN, "right"),
    SynthClass("SlideLeft", "square", GREEN, "left"),
    SynthClass("Rise", "square", GREEN, "up"),
    SynthClass("Fall", "square", GREEN, "down"),
    SynthClass("RedShake", "triangle", RED, "shake"),
    SynthClass("BlueShake", "triangle", BLUE, "shake"),
    SynthClass("MagentaShake", "triangle", MAGENTA, "shake"),
    SynthClass("TealShake", "triangle", TEAL, "shake"),
    SynthClass("OrangeShake", "triangle", ORANGE, "shake"),
    SynthClass("YellowShake", "triangle", YELLOW, "shake"),
    SynthClass("LeafShake", "triangle", LEAF, "shake"),
    SynthClass("PurpleShake", "triangle", PURPLE, "shake"),
)
TEST_GROUPS = range(1, 8)  # as UCF-101's split 1: groups 1-7 test, 8-25 train
TRAIN_GROUPS = range(8, 26)


def write_ucf101_tree(root: Path, clips_per_group: int, frames: int, height: int = 120, width: int = 160,
                      groups: int = 25, seed: int = 0, pan_probability: float = 0.2,
                      classes: tuple[SynthClass, ...] = CLASSES) -> Path:
    """Write <root>/UCF-101/<Class>/v_<Class>_gXX_cYY.avi (MPEG-4 part 2) and the split files
    of split 1 (classInd.txt, trainlist01.txt with 1-based labels, testlist01.txt; CRLF).
    Groups 1-7 are the test split, as in UCF-101; `groups` < 25 writes fewer train groups."""
    rng = np.random.default_rng(seed)
    train_lines, test_lines = [], []
    for label, cls in enumerate(classes):
        folder = root / VIDEO_DIR / cls.name
        folder.mkdir(parents=True, exist_ok=True)
        for group in range(1, groups + 1):
            for clip in range(1, clips_per_group + 1):
                name = f"v_{cls.name}_g{group:02d}_c{clip:02d}.avi"
                video = render_clip(cls, frames, height, width, rng, pan=rng.random() < pan_probability)
                encode_clip(video, folder / name)
                rel = f"{cls.name}/{name}"
                if group in TEST_GROUPS:
                    test_lines.append(rel)
                else:
                    train_lines.append(f"{rel} {label + 1}")
    lists = root / LIST_DIR
    lists.mkdir(parents=True, exist_ok=True)
    _write_crlf(lists / CLASS_INDEX, [f"{i + 1} {c.name}" for i, c in enumerate(classes)])
    _write_crlf(lists / "trainlist01.txt", train_lines)
    _write_crlf(lists / "testlist01.txt", test_lines)
    return root


def render_clip(cls: SynthClass, frames: int, height: int, width: int, rng: np.random.Generator,
                pan: bool = False) -> np.ndarray:
    """(frames, height, width, 3) uint8: a textured shape moving over a textured background."""
    margin = 24
    background = _texture(height + 2 * margin, width + 2 * margin, rng)  # room for a pan
    size = int(rng.integers(30, 42))
    sprite, mask = _sprite(cls.shape, cls.colour, size, rng)
    speed = rng.uniform(2.5, 4.0)
    trajectory = _trajectory(cls.motion, frames, height, width, size, speed, rng)  # (frames, 2) top-left y, x
    pan_velocity = rng.uniform(-0.8, 0.8, size=2) if pan else np.zeros(2)
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        oy, ox = np.clip(np.round(margin + pan_velocity * t).astype(int), 0, 2 * margin)
        frame = background[oy:oy + height, ox:ox + width].copy()
        y, x = np.round(trajectory[t]).astype(int)
        _paste(frame, sprite, mask, y, x)
        noise = rng.standard_normal(size=frame.shape, dtype=np.float32) * 3.0  # sensor noise
        video[t] = np.clip(frame + noise, 0, 255).astype(np.uint8)
    return video


def encode_clip(video: np.ndarray, path: Path, codec: str = "mpeg4", rate: int = 25) -> Path:
    """Encode (T, H, W, 3) uint8 frames with PyAV (mpeg4: MPEG-4 part 2; libx264: H.264)."""
    import av

    with av.open(str(path), mode="w") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = video.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"g": "12"} if codec == "mpeg4" else {"g": "12", "preset": "veryfast"}
        for array in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def _trajectory(motion: str, frames: int, height: int, width: int, size: int, speed: float,
                rng: np.random.Generator) -> np.ndarray:
    t = np.arange(frames)[:, None]
    span = np.array([height - size, width - size], dtype=float)
    travel = speed * (frames - 1)
    if motion in ("right", "left", "up", "down"):
        direction = {"right": (0.0, 1.0), "left": (0.0, -1.0), "up": (-1.0, 0.0), "down": (1.0, 0.0)}[motion]
        direction = np.array(direction)
        low = np.where(direction < 0, -direction * travel, 0.0)
        high = np.maximum(span - np.where(direction > 0, direction * travel, 0.0), low)
        start = rng.uniform(low, high)
        return np.clip(start + t * speed * direction, 0, span)
    if motion == "orbit":
        radius = rng.uniform(10, 16)
        centre = rng.uniform(radius, span - radius)
        phase = rng.uniform(0, 2 * np.pi) + t[:, 0] * speed / radius
        return np.clip(centre + radius * np.stack([np.sin(phase), np.cos(phase)], axis=1), 0, span)
    if motion == "shake":  # sideways back and forth, a few pixels each frame
        start = rng.uniform([0, 2 * speed], span - [0, 2 * speed])
        return np.clip(start + np.stack([np.zeros(frames), speed * (t[:, 0] % 2)], axis=1) * 1.5, 0, span)
    if motion == "idle":  # a small tremor around a fixed point
        start = rng.uniform(0, span)
        return np.clip(start + rng.normal(0, 0.4, size=(frames, 2)), 0, span)
    raise ValueError(f"unknown motion {motion!r}")


def _texture(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Smooth grey-brown clutter with fine grain: block matching needs texture to lock on."""
    coarse = rng.uniform(60, 170, size=(height // 8 + 2, width // 8 + 2, 3))
    smooth = np.kron(coarse, np.ones((8, 8, 1)))[:height, :width]
    return np.clip(smooth * np.array([1.0, 0.95, 0.85]) + rng.normal(0, 12, size=(height, width, 3)), 0, 255)


def _sprite(shape: str, colour: tuple[int, int, int], size: int, rng: np.random.Generator):
    yy, xx = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        mask = np.ones((size, size), dtype=bool)
    elif shape == "disc":
        mask = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 <= (size / 2) ** 2
    elif shape == "triangle":
        mask = np.abs(xx - size / 2) <= yy / 2
    else:
        raise ValueError(f"unknown shape {shape!r}")
    grain = rng.uniform(0.7, 1.1, size=(size, size, 1))
    return np.clip(np.array(colour, dtype=float) * grain, 0, 255), mask


def _paste(frame: np.ndarray, sprite: np.ndarray, mask: np.ndarray, y: int, x: int) -> None:
    h, w = mask.shape
    region = frame[y:y + h, x:x + w]
    m = mask[:region.shape[0], :region.shape[1]]
    region[m] = sprite[:region.shape[0], :region.shape[1]][m]


def _write_crlf(path: Path, lines: list[str]) -> None:
    path.write_bytes("".join(f"{line}\r\n" for line in lines).encode())

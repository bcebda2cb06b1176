"""The `action` task: UCF-101 action classification from the codec's motion vectors (temporal),
RGB frames (spatial) or both (fusion), top-1 accuracy (section IV-D, Tables VIII-X).

The gate sees the temporal modality only (Table X: 2 F_t channels of 24 x 24), which the
sensor has anyway; the spatial frames cross the network only for inputs routed to the spatial
or fusion expert.
"""

from __future__ import annotations

import dataclasses
import io
import shutil
import zlib
from dataclasses import dataclass
from typing import ClassVar
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from bmoe.gating import ACTION_GATE, GateSpec
from storage import AnyPath
from tasks.base import BadInput, Listing, ServedInput, TaskBase
from tasks.inputs import file_stamp, input_path, read_input
from tasks.action import frames as rgb
from tasks.action import models, readers, serving, synthetic
from tasks.action import motion_vectors as mv

EMBED = "emb"  # cache columns emb00.. hold the temporal expert's embedding (Fig. 9)


@dataclass(frozen=True)
class ActionSettings:
    """One profile's settings; logged to MLflow as they are."""

    may_be_zero: ClassVar[tuple[str, ...]] = ("gate_steps",)  # -o KEY=0 allowed

    F_t: int = 160  # motion-vector frames (the paper: 160, Table X's 320 channels; d_0 = 737.3 kB)
    F_s: int = 2  # RGB frames
    H_s: int = 240
    W_s: int = 320  # with F_s = 2: d_1 = 1843.2 kB, as Table VIII
    K: int = 4  # bytes per value in the data cost (float32, the paper's convention)
    motion_scale: float = 1.0  # multiplies the rasterised velocities (pixels per frame)
    classes: int = 101  # UCF-101; the embedded data has len(synthetic.CLASSES)
    split: int = 1  # official UCF-101 split K in 1..3
    val_every: int = 5  # train clips of groups g05, g10, ... form the validation split
    gate_share: float = 0.2  # of train's groups, held out from the experts to train gates (carve_gate_split)
    gate_steps: int = 0  # sweep: optimizer steps per gate (0: the sweep's epochs; the paper states steps)
    upsample: int = 24  # server-side size of the motion grid inside the temporal expert ([53]: 224)
    expert_arch: str = "small"  # small (the CPU demo's CNNs) | emv (EMV-CNN's ZFNet-like streams [53])
    expert_width: float = 1.0
    clips_per_group: int = 3  # embedded data: clips per class and group
    groups: int = 25  # embedded data: groups per class (1-7 test, as UCF-101's split 1; the rest train/val)
    clip_height: int = 120
    clip_width: int = 160
    epochs: int = 12
    batch_size: int = 32
    lr: float = 2e-3


_SYNTH = len(synthetic.CLASSES)
PROFILES = {
    "smoke": ActionSettings(F_t=4, F_s=1, H_s=36, W_s=48, classes=_SYNTH, expert_width=0.25, clips_per_group=1,
                            groups=10, gate_share=0.5, epochs=1, batch_size=16),
    # 80 groups: the experts train on 14 of them (as with 60 groups before), the gate on 44; the
    # gate told shaking from sliding clips 81-93 % of the time from 337 clips, 89-93 % from 675
    "demo": ActionSettings(F_t=8, F_s=1, H_s=72, W_s=96, classes=_SYNTH, expert_width=0.5, clips_per_group=3,
                           groups=80, gate_share=0.76, epochs=10, batch_size=32),
    # the experts of [53] (section IV-D): ZFNet-like streams, the grid upsampled to 224 server-side.
    # Adam at 1e-3 throws their 75M-weight fc6 about (on the real clip, losses 4.9 -> 0.0007 -> 21
    # -> 43 in the first steps); at 1e-4 they fall
    "paper": ActionSettings(gate_steps=80000, expert_arch="emv", upsample=224, epochs=50, batch_size=128, lr=1e-4,
                            clips_per_group=4, clip_height=240, clip_width=320),
}


class ActionTask(TaskBase):
    """Action classification from codec motion vectors and frames: one routing unit per clip."""

    name = "action"
    metric_name = "top-1 accuracy (%)"
    target_columns = ("label",)
    meta_columns = ("label",)
    profiles = PROFILES
    score_batch = 8  # about 1 GB of 160-frame clips at 224 px (TaskBase.score_batch)
    settings: ActionSettings

    def check_settings(self) -> None:
        settings = self.settings
        if settings.split not in (1, 2, 3):
            raise ValueError(f"UCF-101 has splits 1, 2 and 3, not {settings.split}")
        if min(settings.F_t, settings.F_s, settings.H_s, settings.W_s, settings.classes) < 1:
            raise ValueError("F_t, F_s, H_s, W_s and classes must be positive")
        if settings.expert_arch not in models.ARCHS:
            raise ValueError(f"expert_arch={settings.expert_arch!r}: expected one of {', '.join(models.ARCHS)}")
        if settings.expert_arch == "emv" and min(settings.upsample, settings.H_s, settings.W_s) < models.EMV_MIN_SIDE:
            raise ValueError(f"expert_arch=emv needs upsample, H_s and W_s of at least {models.EMV_MIN_SIDE} "
                             f"(its strides and poolings), not {settings.upsample}, {settings.H_s}, {settings.W_s}")

    # -- data -----------------------------------------------------------------------------
    def expert_names(self) -> list[str]:
        return list(models.EXPERT_KINDS)

    def data_costs(self) -> np.ndarray:
        """d_n: temporal F_t*24*24*2*K, spatial F_s*H_s*W_s*3*K, fusion their sum (section IV-D)."""
        s = self.settings
        temporal = s.F_t * mv.GRID * mv.GRID * 2 * s.K
        spatial = s.F_s * s.H_s * s.W_s * 3 * s.K
        return np.array([temporal, spatial, temporal + spatial], dtype=np.float64)

    def embedded_key(self, seed: int) -> dict:
        s = self.settings
        return {"clips_per_group": s.clips_per_group, "groups": s.groups, "frames": self.clip_frames(),
                "height": s.clip_height, "width": s.clip_width, "classes": [c.name for c in synthetic.CLASSES],
                "seed": seed, "version": 3}

    def write_embedded(self, folder: Path, seed: int) -> None:
        """Synthetic clips (drawn with `seed`) encoded with MPEG-4 part 2 in UCF-101's layout (synthetic.py)."""
        s = self.settings
        shutil.rmtree(folder / readers.VIDEO_DIR, ignore_errors=True)  # our own tree: no stale clips
        synthetic.write_ucf101_tree(folder, s.clips_per_group, self.clip_frames(), s.clip_height, s.clip_width,
                                    groups=s.groups, seed=seed)

    def clip_frames(self) -> int:
        """Frames per embedded clip: F_t frames with motion plus the intra frames (GOP 12)."""
        return self.settings.F_t + self.settings.F_t // 11 + 2

    def read_labels(self, data_root: AnyPath) -> dict[str, str]:
        """A UCF-101 tree's label set: one class per line of its classInd.txt (101 for the real one)."""
        return {"classes": str(len(readers.read_class_index(data_root)))}

    def find_sources(self, data_root: AnyPath, split: str) -> Listing:
        """UCF-101's layout, local or in an object store; each source's "path" is the clip's text
        (a URI for a remote clip), "stamp" its [st_size, st_mtime_ns] from the listing, and its
        "group" the class's gXX (clips of one group share actors and scene)."""
        listing = readers.list_split(data_root, split, self.settings.split, self.settings.val_every)
        sources = [{"source_id": c.clip_id, "path": str(c.path), "stamp": file_stamp(c.path), "label": c.label,
                    "group": f"{c.class_name}_g{c.group:02d}"} for c in listing.clips]
        return Listing(sources=sources, problems=list(listing.problems))

    def load(self, source: dict) -> list[dict]:
        """One clip -> one row. The clip's bytes are read once, through its path (UnreadableInput
        if this node cannot); PyAV decodes its motion vectors from them in memory, decord its frames
        (from the local file, or a temporary copy of the bytes for a clip in an object store)."""
        s = self.settings
        path = input_path(source["path"])
        if not 0 <= source["label"] < s.classes:
            raise BadInput(f"{path}: label {source['label'] + 1} is outside the experts' {s.classes} classes "
                           f"(set --task-option classes=N to the number of lines in classInd.txt)")
        data = read_input(path)
        try:
            grid = mv.motion_grids(path, s.F_t, scale=s.motion_scale, data=data)  # (F_t, 24, 24, 2)
            frames = rgb.rgb_frames(path, s.F_s, s.H_s, s.W_s, data=data)  # (F_s, H_s, W_s, 3)
        except (mv.NoMotion, mv.Undecodable, rgb.UnreadableFrames) as err:
            raise BadInput(str(err)) from None
        enc_t, enc_s = motion_bytes(grid), jpeg_bytes(frames)
        x0, x1, x2 = self.expert_inputs(grid, frames)
        return [{"sample_id": source["source_id"], "group": source["group"], "label": int(source["label"]),
                 "gate": grid, "x0": x0, "x1": x1, "x2": x2, "enc0": enc_t, "enc1": enc_s, "enc2": enc_t + enc_s}]

    def expert_inputs(self, grid: np.ndarray, frames: np.ndarray) -> list[np.ndarray]:
        """P_n of one clip, as stored for training and sent when serving: the motion grid, the
        frames, and fusion's packed uint8 row."""
        return [grid, frames, pack(grid, frames)]

    # -- experts --------------------------------------------------------------------------
    def build_expert(self, n: int) -> torch.nn.Module:
        s = self.settings
        return models.build_expert(models.EXPERT_KINDS[n], s.F_t, s.F_s, s.classes, s.expert_width, s.upsample,
                                   arch=s.expert_arch)

    def logits(self, n: int, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
        """(B, classes) logits of expert n on its stored input x<n>."""
        if n == 2:
            return model(*self.unpack(x))
        return model(x)

    def train_loss(self, n: int, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        x = batch["x"]
        if model.training:
            x = self.augment(n, x)
        return F.cross_entropy(self.logits(n, model, x), batch["label"].long())

    def augment(self, n: int, x: torch.Tensor) -> torch.Tensor:
        """Label-preserving shifts for training: an action is the same wherever in the frame it
        happens, so the motion grid and the frames are rolled by a random offset (one per batch).
        Without it the small experts memorise the few demo clips (measured on an earlier version
        of them: temporal expert train 100%, test 61%)."""
        if n == 2:
            vectors, frames = self.unpack(x)
            return pack_torch(self.augment(0, vectors), self.augment(1, frames))
        dy, dx = (int(v) for v in torch.randint(-6, 7, (2,)))
        if n == 1:  # (B, F_s, H_s, W_s, 3): the same fraction of the frame as the grid's cells
            dy, dx = dy * x.shape[2] // mv.GRID, dx * x.shape[3] // mv.GRID
        return torch.roll(x, shifts=(dy, dx), dims=(2, 3))

    def evaluate(self, n: int, model: torch.nn.Module, batch: dict, device: torch.device) -> dict[str, np.ndarray]:
        x = torch.as_tensor(np.array(batch["x"]), device=device)  # a writable copy of Arrow's buffer
        labels = torch.as_tensor(np.asarray(batch["label"]), device=device).long()
        with torch.no_grad():
            logits = self.logits(n, model, x)
        columns = {
            "loss": F.cross_entropy(logits, labels, reduction="none").cpu().numpy(),
            "score": (logits.argmax(dim=1) == labels).float().cpu().numpy(),  # correct: additive under accuracy
            "pred": logits.argmax(dim=1).cpu().numpy(),
        }
        if n == 0:  # the temporal expert's last hidden layer, for Fig. 9
            with torch.no_grad():
                emb = model.embed(x).cpu().numpy()  # (B, D)
            columns.update({f"{EMBED}{k:02d}": emb[:, k] for k in range(emb.shape[1])})
        return columns

    def served_columns(self, rows: list[dict], response: dict, experts: np.ndarray) -> dict[str, np.ndarray]:
        """The served class against the clip's label: evaluate's "pred" and "score" (correct)."""
        pred = int(response["prediction"]["class_index"])  # one routing unit per clip
        return {"pred": np.array([pred]), "score": np.array([float(pred == rows[0]["label"])])}

    def unpack(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fusion's packed uint8 rows -> (B, F_t, 24, 24, 2) float32 vectors, (B, F_s, H_s, W_s, 3) uint8."""
        s = self.settings
        b = x.shape[0]
        n_mv = s.F_t * mv.GRID * mv.GRID * 2 * 4
        vectors = x[:, :n_mv].contiguous().view(torch.float32).reshape(b, s.F_t, mv.GRID, mv.GRID, 2)
        frames = x[:, n_mv:].reshape(b, s.F_s, s.H_s, s.W_s, 3)
        return vectors, frames

    # -- mixture --------------------------------------------------------------------------
    def metric(self, cache: pd.DataFrame, assignment: np.ndarray) -> dict[str, float]:
        if len(cache) == 0:
            return {"performance": float("nan")}
        n_experts = int(assignment.max()) + 1
        correct = cache[[f"score_{n}" for n in range(n_experts)]].to_numpy(dtype=np.float64)
        return {"performance": 100.0 * float(correct[np.arange(len(cache)), assignment].mean())}

    def gate_spec(self) -> GateSpec:
        """Table X with 2 F_t input channels (the paper's 320: F_t = 160); C_g < 1e8."""
        return dataclasses.replace(ACTION_GATE, in_channels=2 * self.settings.F_t)

    def gate_tensor(self, gate: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(M, 2 F_t, 24, 24): the temporal modality, dx and dy of each frame as channels, on
        the device of `gate`."""
        x = torch.as_tensor(gate).to(torch.float32)  # (M, F_t, 24, 24, 2)
        m, f, h, w, _ = x.shape
        return x.permute(0, 1, 4, 2, 3).reshape(m, 2 * f, h, w) / models.MV_UNIT

    def augment_gate(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Random shifts of (B, 2 F_t, 24, 24) grids: which expert a clip needs does not depend
        on where in the frame the action happens, and the gate's FC layers see positions."""
        dy, dx = (int(v) for v in torch.randint(-8, 9, (2,), generator=gen))
        return torch.roll(x, shifts=(dy, dx), dims=(2, 3))

    def heuristic(self, gate: np.ndarray) -> np.ndarray:
        """Motion-vector magnitude and spread: camera motion (the field's median) and too little
        motion of its own (spread about the median) make the temporal mode hard (section IV-D)."""
        v = np.asarray(gate, dtype=np.float64)  # (M, F_t, 24, 24, 2)
        camera = np.median(v, axis=(2, 3), keepdims=True)  # (M, F_t, 1, 1, 2)
        own = np.linalg.norm(v - camera, axis=-1).mean(axis=(1, 2, 3))  # (M,)
        return np.linalg.norm(camera, axis=-1).mean(axis=(1, 2, 3)) - own

    # -- serving (tasks/action/serving.py): one routing unit per clip ------------------------
    def decode_request(self, body: bytes) -> ServedInput:
        return serving.decode_request(self, body)

    def request_inputs(self, request: ServedInput, n: int, units: np.ndarray) -> np.ndarray:
        return serving.request_inputs(request, n, units)

    def serve_expert(self, n: int, model: torch.nn.Module, x: np.ndarray, device: torch.device) -> list[np.ndarray]:
        return serving.serve_expert(self, n, model, x, device)

    def response(self, request: ServedInput, outputs: list[np.ndarray]) -> dict:
        return serving.response(self, outputs)

    def draw_assignment(self, split, assignment: np.ndarray, path: Path) -> Path:
        """Fig. 9: the temporal expert's embeddings of the test clips, by class and by expert."""
        from tasks.action.figure import draw_embedding

        return draw_embedding(split.cache, assignment, self.expert_names(), path)


def pack(grid: np.ndarray, frames: np.ndarray) -> np.ndarray:
    """Fusion's input as one uint8 row: the float32 vectors' bytes, then the frames."""
    return np.concatenate([np.ascontiguousarray(grid, dtype=np.float32).view(np.uint8).ravel(), frames.ravel()])


def pack_torch(vectors: torch.Tensor, frames: torch.Tensor) -> torch.Tensor:
    """The batched inverse of ActionTask.unpack."""
    b = vectors.shape[0]
    return torch.cat([vectors.float().contiguous().view(torch.uint8).reshape(b, -1), frames.reshape(b, -1)], dim=1)


def motion_bytes(grid: np.ndarray) -> int:
    """Encoded size of the temporal modality: the grid as float16, deflated."""
    return len(zlib.compress(grid.astype(np.float16).tobytes(), 6))


def jpeg_bytes(frames: np.ndarray, quality: int = 90) -> int:
    """Encoded size of the spatial modality: each frame as a JPEG."""
    from PIL import Image

    total = 0
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        total += buffer.tell()
    return total

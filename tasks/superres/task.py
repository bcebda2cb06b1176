"""The `superres` task: 64x64 HR patches, bicubic P_n at x4/x3/x2, ESPCN or FSRCNN experts,
PSNR on Y per image reassembled from its patches (section IV-C, Tables V-VII)."""

from __future__ import annotations

import base64
import io
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from PIL import Image

from bmoe.gating import SUPERRES_GATE, GateSpec
from storage import AnyPath
from tasks.base import SOURCE_SPLITS, BadInput, Listing, ServedInput, TaskBase
from tasks.inputs import file_stamp, input_path
from tasks.superres import metrics, models, patches, readers, serving, synthetic


@dataclass(frozen=True)
class SuperResSettings:
    """One profile's settings; logged to MLflow as they are."""

    may_be_zero: ClassVar[tuple[str, ...]] = ("n_procedural", "gate_steps")  # -o KEY=0 allowed

    scales: tuple[int, ...] = patches.SCALES  # experts cheapest first: x4, x3, x2
    model: str = "espcn"  # or "fsrcnn"
    expert_width: float = 1.0
    K: int = 4  # bytes per value in the data cost (float32, the paper's convention)
    max_side: int = 256  # embedded images are resized to at most this side, then cropped to multiples of 64
    n_procedural: int = 8  # procedural images per split in the embedded data
    train_multiplier: int = 1  # the train split gets this many times n_procedural (the gate needs data)
    gate_share: float = 0.2  # of train's images, held out from the experts to train gates (carve_gate_split)
    gate_steps: int = 0  # sweep: optimizer steps per gate (0: the sweep's epochs; the paper states steps)
    epochs: int = 20
    batch_size: int = 32
    lr: float = 1e-3


PROFILES = {
    "smoke": SuperResSettings(expert_width=0.25, max_side=128, n_procedural=2, gate_share=0.5, epochs=1,
                              batch_size=16),
    "demo": SuperResSettings(max_side=320, n_procedural=24, train_multiplier=6, gate_share=0.5, epochs=6,
                             batch_size=32),
    "paper": SuperResSettings(max_side=2048, n_procedural=0, epochs=50, batch_size=128, lr=1e-3),
}


class SuperResTask(TaskBase):
    """Super-resolution: one routing unit per 64x64 patch."""

    name = "superres"
    metric_name = "PSNR (dB, Y channel, border S cropped, per image)"
    target_columns = ("hr", "row", "col", "img_h", "img_w")
    gate_target = "hr"  # the gate sees the HR patch the experts are scored against: stored once, as "gate"
    meta_columns = ("row", "col", "img_h", "img_w")
    request_column = "group"  # an image: its patches are routed in one request
    profiles = PROFILES
    settings: SuperResSettings

    def check_settings(self) -> None:
        if self.settings.model not in models.EXPERT_KINDS:
            raise ValueError(f"unknown super-resolution model {self.settings.model!r}; "
                             f"expected one of {', '.join(models.EXPERT_KINDS)}")

    # -- data -----------------------------------------------------------------------------
    def expert_names(self) -> list[str]:
        return [f"{self.settings.model}_x{s}" for s in self.settings.scales]

    def data_costs(self) -> np.ndarray:
        return np.array([patches.data_cost_bytes(s, self.settings.K) for s in self.settings.scales])

    def embedded_key(self, seed: int) -> dict:
        s = self.settings
        return {"max_side": s.max_side, "n_procedural": s.n_procedural, "train_multiplier": s.train_multiplier,
                "seed": seed, "version": 3}

    def write_embedded(self, folder: Path, seed: int) -> None:
        """scikit-image's photographs plus procedural textures (drawn with `seed`) as PNG files,
        one folder per split."""
        for split in SOURCE_SPLITS:
            count = self.settings.n_procedural * (self.settings.train_multiplier if split == "train" else 1)
            images = synthetic.embedded_images(split, n_procedural=count, max_side=self.settings.max_side,
                                               seed=SOURCE_SPLITS.index(split) + len(SOURCE_SPLITS) * seed)
            shutil.rmtree(folder / split, ignore_errors=True)  # our own tree: no images of other settings
            synthetic.write_png_folder(images, folder / split)

    def find_sources(self, data_root: AnyPath, split: str) -> Listing:
        """DIV2K, split folders (the embedded layout), or any folder of PNG/JPEG images, local or
        in an object store; each source's "path" is the file's text (a URI for a remote file)."""
        listing = readers.find_images(data_root, split)
        sources = [{"source_id": p.stem, "path": str(p), "stamp": file_stamp(p)} for p in listing.paths]
        return Listing(sources=sources, problems=list(listing.problems))

    def load(self, source: dict) -> list[dict]:
        """One image -> its 64x64 patches as rows; UnreadableInput if this node cannot read it."""
        try:
            image = readers.load_rgb(input_path(source["path"]))  # (H, W, 3) uint8; read, then decoded
        except readers.BadImage as err:
            raise BadInput(str(err)) from None
        hr, pos = patches.to_patches(image)  # (P, 64, 64, 3), (P, 2)
        rows = []
        low = [patches.downscale(hr, s) for s in self.settings.scales]  # N x (P, h_n, w_n, 3)
        for i in range(len(hr)):
            row = {"sample_id": f"{source['source_id']}/{pos[i, 0]:05d}_{pos[i, 1]:05d}",
                   "group": source["source_id"], "gate": hr[i], "hr": hr[i],
                   "row": int(pos[i, 0]), "col": int(pos[i, 1]),
                   "img_h": int(image.shape[0]), "img_w": int(image.shape[1])}
            for n, lr in enumerate(low):
                row[f"x{n}"] = lr[i]
                row[f"enc{n}"] = patches.png_bytes(lr[i])
            rows.append(row)
        return rows

    # -- experts --------------------------------------------------------------------------
    def build_expert(self, n: int) -> torch.nn.Module:
        return models.build_expert(self.settings.model, self.settings.scales[n], width=self.settings.expert_width)

    def train_loss(self, n: int, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        sr = model(_to_float(batch["x"]))  # (B, 3, 64, 64)
        return F.mse_loss(sr, _to_float(batch["hr"]))

    def evaluate(self, n: int, model: torch.nn.Module, batch: dict, device: torch.device) -> dict[str, np.ndarray]:
        x = _to_float(torch.as_tensor(batch["x"], device=device))
        sr = model(x).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255.0  # (B, 64, 64, 3)
        return self._patch_columns(sr, batch, self.settings.scales[n])

    def served_columns(self, rows: list[dict], response: dict, experts: np.ndarray) -> dict[str, np.ndarray]:
        """The served image cut back into the rows' patches (uint8, as served), scored as evaluate
        scores an expert's patches: border S of the expert each patch went to."""
        image = np.asarray(Image.open(io.BytesIO(base64.b64decode(response["prediction"]["image_png_base64"]))))
        sr = np.stack([image[r["row"]:r["row"] + patches.PATCH, r["col"]:r["col"] + patches.PATCH, :3]
                       for r in rows]).astype(np.float64)  # (U, 64, 64, 3)
        batch = {k: np.array([r[k] for r in rows]) for k in self.target_columns}
        columns: dict[str, np.ndarray] = {}
        for n in np.unique(experts):
            idx = np.flatnonzero(experts == n)
            part = self._patch_columns(sr[idx], {k: v[idx] for k, v in batch.items()}, self.settings.scales[n])
            for key, values in part.items():
                columns.setdefault(key, np.full(len(rows), np.nan))[idx] = values
        return columns

    @staticmethod
    def _patch_columns(sr: np.ndarray, batch: dict, scale: int) -> dict[str, np.ndarray]:
        """Cache columns of SR patches (B, 64, 64, 3) in [0, 255] against the batch's HR patches."""
        hr = np.asarray(batch["hr"], dtype=np.float64)
        pos = np.stack([batch["row"], batch["col"]], axis=1)  # (B, 2)
        shapes = np.stack([batch["img_h"], batch["img_w"]], axis=1)  # (B, 2)
        sums = np.zeros((4, len(hr)))  # sse_y, count_y, sse_rgb, count_rgb
        for shape in np.unique(shapes, axis=0):  # the border mask depends on the image's shape
            idx = np.flatnonzero((shapes == shape).all(axis=1))
            errs = metrics.patch_errors(sr[idx], hr[idx], pos[idx], tuple(shape), scale)
            sums[:, idx] = np.stack(errs)
        sse_y, count_y, sse_rgb, count_rgb = sums
        mse_y = sse_y / np.maximum(count_y, 1)
        return {
            "loss": ((sr - hr) ** 2).mean(axis=(1, 2, 3)) / 255.0**2,  # the training loss, per patch
            "score": -mse_y,  # additive: pooled per image before PSNR's log
            "sse_y": sse_y,
            "count_y": count_y,
            "sse_rgb": sse_rgb,
            "count_rgb": count_rgb,
        }

    # -- mixture --------------------------------------------------------------------------
    def metric(self, cache: pd.DataFrame, assignment: np.ndarray) -> dict[str, float]:
        if len(cache) == 0:
            return {"performance": float("nan"), "psnr_rgb": float("nan")}
        pick = {col: _chosen(cache, col, assignment) for col in ("sse_y", "count_y", "sse_rgb", "count_rgb")}
        groups = cache["group"].to_numpy()
        y = metrics.per_image_psnr(groups, pick["sse_y"], pick["count_y"])
        rgb = metrics.per_image_psnr(groups, pick["sse_rgb"], pick["count_rgb"])
        return {"performance": float(np.nanmean(list(y.values()))), "psnr_rgb": float(np.nanmean(list(rgb.values())))}

    def gate_spec(self) -> GateSpec:
        return SUPERRES_GATE  # Table VII: the 64x64 HR patch, C_g < 1e7

    def gate_tensor(self, gate: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(M, 3, 64, 64) patches standardised with fixed constants (no data-dependent state),
        on the device the stored uint8 patches are on."""
        return (_to_float(torch.as_tensor(gate)) - 0.45) / 0.25

    def sample_weights(self, cache: pd.DataFrame) -> np.ndarray:
        """(M,) first-order weight of each patch in the reported metric: a patch's squared error
        moves its image's PSNR by -10/ln 10 * delta_sse / SSE_image, so the same error costs more
        dB in a clean image than in a textured one. The oracle's scores are weighted by it."""
        mse = np.stack([cache[f"sse_y_{n}"] / np.maximum(cache[f"count_y_{n}"], 1)
                        for n in range(len(self.settings.scales))], axis=1).mean(axis=1)
        per_image = pd.Series(mse).groupby(cache["group"].to_numpy()).transform("mean").to_numpy()
        return 1.0 / np.maximum(per_image, 1e-12)

    def augment_gate(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Flips and transposes of (B, 3, 64, 64) patches: how much resolution a patch needs
        does not depend on its orientation, so the gate sees eight times the variety."""
        flips = torch.randint(0, 2, (3,), generator=gen).tolist()
        if flips[0]:
            x = x.flip(2)
        if flips[1]:
            x = x.flip(3)
        if flips[2]:
            x = x.transpose(2, 3)
        return x

    def heuristic(self, gate: np.ndarray) -> np.ndarray:
        """Gradient energy of the patch's luma: textured patches need more resolution."""
        y = metrics.rgb_to_y(np.asarray(gate, dtype=np.float64))  # (M, 64, 64)
        return (np.diff(y, axis=1) ** 2).mean(axis=(1, 2)) + (np.diff(y, axis=2) ** 2).mean(axis=(1, 2))

    # -- serving (tasks/superres/serving.py): one routing unit per 64x64 patch ----------------
    def decode_request(self, body: bytes) -> ServedInput:
        return serving.decode_request(body, self.settings.K)

    def request_inputs(self, request: ServedInput, n: int, units: np.ndarray) -> np.ndarray:
        return serving.request_inputs(request, self.settings.scales[n], units)

    def serve_expert(self, n: int, model: torch.nn.Module, x: np.ndarray, device: torch.device) -> list[np.ndarray]:
        return serving.serve_expert(model, x, device)

    def response(self, request: ServedInput, outputs: list[np.ndarray]) -> dict:
        return serving.response(request, outputs)

    def draw_assignment(self, split, assignment: np.ndarray, path: Path) -> Path:
        """Fig. 7: the test image with the most patches, each patch framed by its expert's colour."""
        from tasks.superres.figure import draw_assignment

        return draw_assignment(split, assignment, self.expert_names(), path)


def _to_float(x: torch.Tensor) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1]."""
    return x.permute(0, 3, 1, 2).float() / 255.0


def _chosen(cache: pd.DataFrame, column: str, assignment: np.ndarray) -> np.ndarray:
    n_experts = int(assignment.max()) + 1 if len(assignment) else 0
    columns = [f"{column}_{n}" for n in range(max(n_experts, 1))]
    values = cache[columns].to_numpy(dtype=np.float64)  # (M, N')
    return values[np.arange(len(cache)), assignment]

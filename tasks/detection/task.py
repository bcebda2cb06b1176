"""The `detection` task: SSD experts at input resolutions R_n (100, 150, 300 px in the paper),
AP@0.5 (pycocotools COCOeval stats[1], bbox) of the mixture's pooled detections, and the Table IV
gate on a centre crop (section IV-B, Tables I-IV, Fig. 4).

The paper scores detection at IoU 0.5: its SSD experts' {57.91, 64.60, 80.01} % (Table II) are
VOC-style mAP@0.5 (COCO's AP@[.5:.95] for an SSD300 is about 23-25, its AP@0.5 about 41-43).
So AP@0.5 is the performance every table, ρ and the oracle use; AP@[.5:.95] is reported beside
it as map_50_95.

P_n resizes the whole image to R x R; d_n = 3 R^2 K bytes, and the JPEG bytes of P_n(x) are
recorded as well. COCO category ids are kept end to end: targets, cached detections and the
reported mAP all use them; only inside an expert are they labels 1..C.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np
import pandas as pd
import torch
from PIL import Image

from bmoe.gating import DETECTION_GATE, GateSpec
from storage import AnyPath
from tasks.base import OPTIMIZERS, BadInput, ExpertTraining, Listing, ServedInput, TaskBase
from tasks.inputs import input_path
from tasks.detection import metrics, models, readers, serving, synthetic

COCO80 = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
          33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
          60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)


@dataclass(frozen=True)
class DetectionSettings:
    """One profile's settings; logged to MLflow as they are."""

    added_later: ClassVar[tuple[str, ...]] = ("gate_depth", "gate_hidden")  # tasks.base.settings_record
    may_be_zero: ClassVar[tuple[str, ...]] = ("min_side", "train_images", "val_images", "gate_steps",
                                              "detections_per_img", "momentum", "weight_decay",
                                              "warmup_steps")  # -o KEY=0 allowed

    resolutions: tuple[int, ...] = (100, 150, 300)  # R_n, experts cheapest first
    model: str = "vgg16"  # models.MODELS: vgg16 | resnet50 | ssdlite | tiny
    width: float = 1.0  # the tiny backbone's channel multiplier
    backbone_weights: str = ""  # where a fit's backbone starts (vgg16, resnet50): "" from scratch, "torchvision"
    # its ImageNet weights (downloaded), else an absolute path or URI of a state dict (models.BACKBONES' keys)
    detections_per_img: int = 0  # kept per image after NMS; 0: as the paper evaluates (models.DETECTIONS:
    # vgg16 300, resnet50 50)
    min_side: int = 0  # the tiny SSD upsamples a smaller P_n(x) to this side, server-side (the paper's SSD300
    # upsamples every P_n to 300). Demo: 75, so the 50 px expert's coarsest map is not 2x2 while each dearer
    # expert keeps a finer anchor grid: with all three at 150 they scored alike (val mAP .32/.33/.30, measured)
    categories: tuple[int, ...] = COCO80  # the label set, as COCO category ids
    K: int = 4  # bytes per value in the data cost (float32, the paper's convention)
    gate_source: int = 300  # the gate sees a centre crop of the image resized to this side...
    gate_crop: int = 224  # ...of this side (Table IV: 224 of 300)
    gate_depth: int = 1  # the gate's conv stages (bmoe.gating.Gate): 1 is Table IV's gate
    gate_hidden: int = 1024  # its hidden FC units (Table IV: 1024)
    max_boxes: int = 100  # training targets per image, padded (evaluation keeps every box)
    jpeg_quality: int = 90  # for the recorded JPEG bytes of P_n(x)
    train_images: int = 0  # embedded data: synthetic train2017 scenes
    val_images: int = 0  # embedded data: synthetic val2017 scenes (halved into val and test)
    gate_share: float = 0.2  # of train's images, held out from the experts to train gates (carve_gate_split)
    gate_steps: int = 0  # sweep: optimizer steps per gate (0: the sweep's epochs; the paper states steps)
    # The experts' recipe: torchvision's references/detection for SSD300 (120 epochs, batch 4 x 8 GPUs,
    # SGD lr 0.002, momentum 0.9, weight decay 5e-4, a linear warm-up from lr/1000 over the first 1000
    # steps; the reference cuts it to epoch 1's steps, train_experts.step_lr does not). From scratch on
    # real COCO images, Adam at 2e-3 took the loss from 82 to 625,159 in one step, SGD at 2e-3 with a
    # 2-step warm-up to 1.9e7 in three, SGD with a 20-step warm-up down to 32 (measured, batch 2).
    epochs: int = 120
    batch_size: int = 32
    lr: float = 2e-3
    optimizer: str = "sgd"  # tasks.base.OPTIMIZERS: sgd | adam
    momentum: float = 0.9  # sgd only
    weight_decay: float = 5e-4
    warmup_steps: int = 1000  # optimizer steps


PROFILES = {
    "smoke": DetectionSettings(resolutions=(36, 48, 64), model="tiny", width=0.5, categories=synthetic.CATEGORY_IDS,
                               gate_source=64, gate_crop=48, max_boxes=16, train_images=24, val_images=16,
                               gate_share=0.5, epochs=1, batch_size=8, optimizer="adam", weight_decay=0.0,
                               warmup_steps=0),
    # The demo's gate sees the whole image (squashed to 128 px) through three stages (C_g 3.1e6 at
    # width 1): the Table IV gate told its scene kinds apart 46-56 % of the time whatever its input
    # (96 px crop, whole image at 128 or 192 px), which needs seeing a few small objects anywhere;
    # three stages with global pooling 83-86 %, and an enforce gate so trained earned +0.13..+0.44
    # of the oracle's gain (Table IV's: +0.00..+0.18). bench/results/gate_levers.json.
    "demo": DetectionSettings(resolutions=(50, 100, 150), model="tiny", min_side=75, categories=synthetic.CATEGORY_IDS,
                              gate_source=128, gate_crop=128, gate_depth=3, gate_hidden=256, max_boxes=16,
                              train_images=1200, val_images=600,
                              gate_share=0.5, epochs=8, batch_size=16, lr=1e-3, optimizer="adam",
                              weight_decay=0.0, warmup_steps=0),
    "paper": DetectionSettings(gate_steps=20000),  # section IV-B: mixtures train for 20k steps
}


class DetectionTask(TaskBase):
    """Single-shot detection: one routing unit per image."""

    name = "detection"
    metric_name = "COCO AP@0.5 (pycocotools stats[1], bbox, pooled detections; AP@[.5:.95] as map_50_95)"
    target_columns = ("boxes", "labels", "gt", "img_w", "img_h", "image_id")
    train_columns = ("boxes", "labels")  # what an expert trains on: fixed-size tensors
    meta_columns = ("gt", "img_w", "img_h", "image_id")
    profiles = PROFILES
    score_batch = 16  # about 1 GB of a paper-size SSD300's activations (TaskBase.score_batch)
    settings: DetectionSettings

    def check_settings(self) -> None:
        settings = self.settings
        if settings.model not in models.MODELS:
            raise ValueError(f"unknown detection model {settings.model!r}; expected one of {', '.join(models.MODELS)}")
        weights = settings.backbone_weights
        if weights and settings.model not in models.BACKBONES:
            raise ValueError(f"backbone_weights={weights!r}: the {settings.model} expert has no ImageNet backbone "
                             f"to load (only {', '.join(models.BACKBONES)}); leave it empty")
        if weights not in ("", "torchvision") and "://" not in weights and not Path(weights).expanduser().is_absolute():
            raise ValueError(f"backbone_weights={weights!r}: give an absolute path or a URI (the Ray workers that "
                             f"load it need not share this working directory)")
        if settings.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={settings.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")
        if settings.gate_crop > settings.gate_source:
            raise ValueError(f"gate_crop {settings.gate_crop} is larger than gate_source {settings.gate_source}")
        lut = np.zeros(max(settings.categories) + 1, dtype=np.int64)
        lut[list(settings.categories)] = np.arange(1, len(settings.categories) + 1)
        self._label_of = torch.as_tensor(lut)  # COCO id -> label 1..C
        self._coco_id = np.array((0, *settings.categories), dtype=np.float32)  # label -> COCO id
        self._pooled = metrics.PooledCOCOEval()

    @classmethod
    def for_profile(cls, profile: str, **overrides) -> "DetectionTask":
        if str(overrides.get("categories")) in ("coco", "coco80"):  # all 80 COCO categories
            overrides = {**overrides, "categories": COCO80}
        return super().for_profile(profile, **overrides)

    # -- data -----------------------------------------------------------------------------
    def expert_names(self) -> list[str]:
        return [f"ssd_{self.settings.model}_{r}" for r in self.settings.resolutions]

    def data_costs(self) -> np.ndarray:
        return np.array([3.0 * r * r * self.settings.K for r in self.settings.resolutions])  # d_n = 3 R^2 K

    def embedded_key(self, seed: int) -> dict:
        s = self.settings
        return {"train": s.train_images, "val": s.val_images, "seed": seed, "version": 4}

    def write_embedded(self, folder: Path, seed: int) -> None:
        """Synthetic scenes (drawn with `seed`) written as a real COCO tree (instances JSON + JPEG files)."""
        s = self.settings
        if s.train_images <= 0 or s.val_images <= 0:
            raise BadInput(f"these settings have no embedded data (train_images={s.train_images}, val_images="
                           f"{s.val_images}): pass --data-root with a COCO tree, or -o train_images=N -o val_images=N")
        synthetic.write_coco_tree(folder, {"train2017": s.train_images, "val2017": s.val_images}, seed=seed)

    def read_labels(self, data_root: AnyPath) -> dict[str, str]:
        """A COCO tree's label set: the categories its instances JSON declares (COCO's 80 for the real one)."""
        return {"categories": ",".join(str(c) for c in readers.declared_categories(data_root))}

    def find_sources(self, data_root: AnyPath, split: str) -> Listing:
        """A COCO tree, local or in an object store (readers.list_split: the split rules, the
        problems named and counted, each source's path, stamp, size and annotations)."""
        sources, problems = readers.list_split(data_root, split, self.settings.categories)
        return Listing(sources=sources, problems=problems)

    def load(self, source: dict) -> list[dict]:
        """One image -> one row: P_n(x) per R_n with its JPEG size, the gate's centre crop, padded
        training targets (at most max_boxes, largest first) and every annotation for COCOeval.
        UnreadableInput if this node cannot read the image, BadInput if it does not decode."""
        s = self.settings
        width, height = int(source["width"]), int(source["height"])
        try:
            image = readers.load_image(input_path(source["path"]), width, height)  # (H, W, 3) uint8
        except readers.BadImage as err:
            raise BadInput(str(err)) from None
        anns = np.asarray(source["anns"], dtype=np.float64).reshape(-1, metrics.GT_FIELDS)
        train = anns[anns[:, 5] == 0]  # crowd regions are ignored by COCOeval and not trained on
        train = train[np.argsort(-train[:, 2] * train[:, 3], kind="stable")[:s.max_boxes]]
        boxes = np.zeros((s.max_boxes, 4), dtype=np.float32)  # xyxy in [0, 1] of the image
        labels = np.zeros(s.max_boxes, dtype=np.int64)  # COCO ids; 0 = padding
        scale = np.array([width, height, width, height])
        boxes[:len(train)] = np.concatenate([train[:, :2], train[:, :2] + train[:, 2:4]], axis=1) / scale
        labels[:len(train)] = train[:, 4]
        pil = Image.fromarray(image)
        source_side = pil.resize((s.gate_source, s.gate_source), Image.BILINEAR)
        lo = (s.gate_source - s.gate_crop) // 2
        row = {"sample_id": f"{int(source['image_id']):012d}", "group": str(source["source_id"]),
               "gate": np.asarray(source_side)[lo:lo + s.gate_crop, lo:lo + s.gate_crop],
               "boxes": boxes, "labels": labels, "gt": metrics.pack(anns, np.float64),
               "img_w": width, "img_h": height, "image_id": int(source["image_id"])}
        for n, r in enumerate(s.resolutions):
            small = source_side if r == s.gate_source else pil.resize((r, r), Image.BILINEAR)
            row[f"x{n}"] = np.asarray(small)  # (R, R, 3) uint8: what crosses the network
            buffer = io.BytesIO()
            small.save(buffer, format="JPEG", quality=s.jpeg_quality)
            row[f"enc{n}"] = buffer.tell()
        return [row]

    # -- experts --------------------------------------------------------------------------
    def build_expert(self, n: int) -> torch.nn.Module:
        s = self.settings
        return models.build_detector(s.model, len(s.categories) + 1, s.resolutions[n], s.width, s.min_side,
                                     s.detections_per_img)

    def check_pretrained(self) -> None:
        if self.settings.backbone_weights:
            self.initial_expert(0)  # every expert loads the same backbone

    def initial_expert(self, n: int) -> torch.nn.Module:
        """build_expert's SSD with settings.backbone_weights loaded (ImageNet features, as torchvision's
        references start SSD300); BadInput in one line when they cannot be had or do not fit."""
        weights, name = self.settings.backbone_weights, self.settings.model
        if not weights:
            return self.build_expert(n)
        try:
            state = models.read_backbone(name, weights)
            model = self.build_expert(n)
            models.load_backbone(model, name, state, weights)
        except models.BackboneError as err:
            raise BadInput(f"-o backbone_weights={weights}: {err}: pass -o backbone_weights=PATH to a torch.save'd "
                           f"{models.BACKBONES[name]}, or -o backbone_weights= to train from scratch") from None
        return model

    def expert_training(self, n: int) -> ExpertTraining:
        """The settings' recipe (the paper profile's: torchvision's SGD + warm-up for SSD300)."""
        s = self.settings
        return ExpertTraining(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr, optimizer=s.optimizer,
                              momentum=s.momentum, weight_decay=s.weight_decay, warmup_steps=s.warmup_steps)

    def train_loss(self, n: int, model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """SSD's loss (box regression + classification with hard negatives); in eval mode the
        mean of the per-image losses (torchvision's eval forward returns detections only). The two
        differ only in normalising by each image's matched anchors rather than the batch's: on the
        same weights and real COCO images, 67.4 vs 65.8 at init, 25.35 vs 25.32 after 4 steps."""
        images, targets = self._inputs(n, batch, flip=model.training)
        if model.training:
            return sum(model(images, targets).values())
        return models.losses_and_detections(getattr(model, "module", model), images, targets)[0].mean()

    def evaluate(self, n: int, model: torch.nn.Module, batch: dict, device: torch.device) -> dict[str, np.ndarray]:
        tensors = {k: torch.as_tensor(np.asarray(batch[k]), device=device) for k in ("x", "boxes", "labels")}
        images, targets = self._inputs(n, tensors, flip=False)
        losses, found = models.losses_and_detections(model, images, targets)
        r = self.settings.resolutions[n]
        widths, heights = np.asarray(batch["img_w"]), np.asarray(batch["img_h"])
        columns = []
        for i, det in enumerate(found):
            box = det["boxes"].cpu().numpy() * np.array([widths[i], heights[i], widths[i], heights[i]]) / r
            rows = np.column_stack([box[:, :2], box[:, 2:] - box[:, :2], det["scores"].cpu().numpy(),
                                    self._coco_id[det["labels"].cpu().numpy()]])  # (D, 6) xywh, score, COCO id
            columns.append(self._image_columns(rows, {k: batch[k][i] for k in self.meta_columns}))
        return {
            "loss": losses.cpu().numpy(),  # the SSD loss of each image: the gate's training signal
            **{key: np.array([c[key] for c in columns], dtype=object if key == "dets" else None)
               for key in ("score", "objects", "dets")},
        }

    def served_columns(self, rows: list[dict], response: dict, experts: np.ndarray) -> dict[str, np.ndarray]:
        """The response's boxes (original pixels, as served) scored as evaluate scores an expert's."""
        found = np.array([[*d["bbox"], d["score"], d["category_id"]] for d in response["prediction"]["detections"]],
                         dtype=np.float64).reshape(-1, 6)
        column = self._image_columns(found, rows[0])  # one routing unit per image
        return {"score": np.array([column["score"]]), "objects": np.array([column["objects"]]),
                "dets": np.array([column["dets"]], dtype=object)}

    def _image_columns(self, rows: np.ndarray, meta: dict) -> dict:
        """One image's cache columns from its detections (D, 6) [x, y, w, h, score, COCO id] in its pixels:
        the packed detections, the image's own AP@0.5 (the oracle's weighted score), its objects."""
        dets = metrics.pack(rows, np.float32)
        size = (int(meta["img_w"]), int(meta["img_h"]))
        return {"dets": dets, "score": metrics.image_ap50(int(meta["image_id"]), size, meta["gt"], dets),
                "objects": int((metrics.unpack_gt(meta["gt"])[:, 5] == 0).sum())}

    def _inputs(self, n: int, batch: dict, flip: bool) -> tuple[list[torch.Tensor], list[dict]]:
        """SSD's inputs: images (3, R, R) in [0, 1] and targets in R-pixel xyxy with labels 1..C;
        flip: a random horizontal flip of each image and its boxes (training augmentation)."""
        r = self.settings.resolutions[n]
        x = batch["x"].permute(0, 3, 1, 2).float() / 255.0  # (B, 3, R, R)
        lut = self._label_of.to(x.device)
        images, targets = [], []
        for i in range(len(x)):
            valid = batch["labels"][i] > 0
            box = batch["boxes"][i][valid].float() * r  # (G, 4)
            image = x[i]
            if flip and torch.rand(()) < 0.5:
                image = image.flip(-1)
                box = torch.stack([r - box[:, 2], box[:, 1], r - box[:, 0], box[:, 3]], dim=1)
            keep = (box[:, 2] > box[:, 0]) & (box[:, 3] > box[:, 1])
            images.append(image)
            targets.append({"boxes": box[keep], "labels": lut[batch["labels"][i][valid][keep]]})
        return images, targets

    # -- mixture --------------------------------------------------------------------------
    def metric(self, cache: pd.DataFrame, assignment: np.ndarray) -> dict[str, float]:
        """COCO AP@0.5 (and AP@[.5:.95]) of the pooled detections, image i's from expert assignment[i]."""
        if len(cache) == 0:
            return {"performance": float("nan"), "map_50_95": float("nan")}
        assignment = np.asarray(assignment, dtype=np.int64)
        columns = [cache[f"dets_{n}"].to_numpy() for n in range(int(assignment.max()) + 1)]
        dets = [columns[a][i] for i, a in enumerate(assignment)]
        sizes = list(zip(cache["img_w"].to_numpy(), cache["img_h"].to_numpy()))
        result = self._pooled.evaluate(cache["image_id"].to_numpy(), sizes, list(cache["gt"].to_numpy()), dets)
        return {"performance": result["map50"], "map_50_95": result["map"]}

    def sample_weights(self, cache: pd.DataFrame) -> np.ndarray:
        """(M,) objects per image: pooled AP weighs an image by how many boxes it holds, so the
        oracle weighs each image's own AP by it."""
        return np.maximum(cache["objects_0"].to_numpy(dtype=np.float64), 1.0)

    def gate_spec(self) -> GateSpec:
        side = self.settings.gate_crop
        return replace(DETECTION_GATE, in_size=(side, side), n_experts=len(self.settings.resolutions),
                       depth=self.settings.gate_depth, hidden=self.settings.gate_hidden)

    def gate_tensor(self, gate: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(M, 3, C, C) centre crops standardised with fixed constants, on the device of `gate`."""
        x = torch.as_tensor(gate).permute(0, 3, 1, 2).float() / 255.0
        return (x - 0.45) / 0.25

    def augment_gate(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """Horizontal flips: how much resolution a scene needs does not depend on its handedness."""
        return x.flip(3) if int(torch.randint(0, 2, (1,), generator=gen)) else x

    def heuristic(self, gate: np.ndarray) -> np.ndarray:
        """Edge density of the crop: the share of pixels with a strong luma gradient (many small
        objects and clutter make many edges)."""
        y = np.asarray(gate, dtype=np.float32) @ np.array([0.299, 0.587, 0.114], dtype=np.float32)  # (M, C, C)
        gx, gy = np.abs(np.diff(y, axis=2))[:, :-1, :], np.abs(np.diff(y, axis=1))[:, :, :-1]
        return ((gx + gy) > 40.0).mean(axis=(1, 2))

    # -- serving (tasks/detection/serving.py): one routing unit per image ----------------------
    def decode_request(self, body: bytes) -> ServedInput:
        s = self.settings
        return serving.decode_request(body, s.gate_source, s.gate_crop, s.K)

    def request_inputs(self, request: ServedInput, n: int, units: np.ndarray) -> np.ndarray:
        return serving.request_inputs(request, self.settings.resolutions[n], units)

    def serve_expert(self, n: int, model: torch.nn.Module, x: np.ndarray, device: torch.device) -> list[np.ndarray]:
        return serving.serve_expert(model, x, device, self._coco_id)

    def response(self, request: ServedInput, outputs: list[np.ndarray]) -> dict:
        return serving.response(request, outputs)

    def draw_assignment(self, split, assignment: np.ndarray, path: Path) -> Path:
        """Test images per expert the gate chose (Fig. 4's companion picture)."""
        from tasks.detection.figure import draw_assignment

        return draw_assignment(split, assignment, self.expert_names(), path)


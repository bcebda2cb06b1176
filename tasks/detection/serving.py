"""Serving hooks of the detection task (tasks.base.Task, serving section).

The client POSTs one whole PNG/JPEG image: one routing unit. The sensor side makes the gate's
input exactly as `DetectionTask.load` makes the prepared gate column (the centre crop of the
image resized to gate_source), the gate picks an expert, and only that expert's P_n (the whole
image resized to R_n x R_n, uint8, as in training) crosses. The expert answers with a (k, 6)
float32 array per image, rows [x, y, w, h, score, COCO category id] with the box normalised to
[0, 1] of the image (P_n is the whole image, so the normalised box holds in every frame). The
response scales the boxes to the original image's pixels.

Decoding follows the task's reader (tasks/images.py), with one addition: an EXIF orientation
tag is applied first, as a viewer would, so the boxes fit the image the client sees. Files
without that tag (every COCO and synthetic image) decode exactly as in training.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

from tasks.base import InputTooSmall, ServedInput
from tasks.images import decode_request_image

MIN_SIDE = 8  # smaller images hold no detectable object even before the resize to R_n

# The 80 COCO 2017 category names, in the order of tasks.detection.task.COCO80 (ids 1..90).
COCO_NAMES = dict(zip(
    (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32,
     33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59,
     60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90),
    ("person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
     "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
     "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
     "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
     "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
     "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
     "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
     "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
     "teddy bear", "hair drier", "toothbrush"),
    strict=True,
))


def decode_request(body: bytes, gate_source: int, gate_crop: int, K: int) -> ServedInput:  # noqa: N803 - the paper's K
    """PNG/JPEG bytes -> one routing unit: the gate's centre crop; the decoded image stays in context."""
    rgb = decode_request_image(body)  # (H, W, 3) uint8, as readers.load_image, EXIF orientation applied
    height, width = rgb.shape[:2]
    if height < MIN_SIDE or width < MIN_SIDE:
        raise InputTooSmall(f"{width}x{height} image is under {MIN_SIDE} pixels a side; send a larger image")
    pil = Image.fromarray(rgb)
    source_side = np.asarray(pil.resize((gate_source, gate_source), Image.BILINEAR))  # as DetectionTask.load
    lo = (gate_source - gate_crop) // 2
    gate = source_side[lo:lo + gate_crop, lo:lo + gate_crop][None].copy()  # (1, C, C, 3) uint8, writable
    return ServedInput(gate_input=gate, full_data_cost=float(rgb.size * K), full_wire_bytes=int(rgb.nbytes),
                       context={"image": pil, "width": width, "height": height})


def request_inputs(request: ServedInput, resolution: int, units: np.ndarray) -> np.ndarray:
    """(len(units), R, R, 3) uint8: P_n of the image, the bilinear resize of DetectionTask.load."""
    small = np.asarray(request.context["image"].resize((resolution, resolution), Image.BILINEAR))
    return np.repeat(small[None], len(np.asarray(units)), axis=0)  # one unit per request: len(units) <= 1


def serve_expert(model: torch.nn.Module, x: np.ndarray, device: torch.device, coco_id: np.ndarray
                 ) -> list[np.ndarray]:
    """P_n images (B, R, R, 3) uint8 -> one (k, 6) float32 array each: [x, y, w, h] normalised
    to [0, 1] of the image, score, COCO category id; best score first.

    Args:
        coco_id: (C + 1,) the COCO id of each expert label (index 0 is background).
    """
    side = float(x.shape[1])
    images = torch.as_tensor(np.asarray(x), device=device).permute(0, 3, 1, 2).float() / 255.0  # (B, 3, R, R)
    with torch.no_grad():
        found = model(list(images))  # eval mode: B dicts, boxes (k, 4) xyxy in R pixels
    outputs = []
    for det in found:
        box = det["boxes"].cpu().numpy() / side  # (k, 4) xyxy in [0, 1]
        scores = det["scores"].cpu().numpy()
        rows = np.column_stack([box[:, :2], box[:, 2:] - box[:, :2], scores, coco_id[det["labels"].cpu().numpy()]])
        outputs.append(rows[np.argsort(-scores, kind="stable")].astype(np.float32).reshape(-1, 6))
    return outputs


def response(request: ServedInput, outputs: list[np.ndarray]) -> dict:
    """{"detections": [{"bbox": [x, y, w, h] in the original image's pixels, "score", "category_id",
    "category"}], "width", "height"}: every box the expert returned (its own score threshold)."""
    width, height = request.context["width"], request.context["height"]
    rows = np.asarray(outputs[0], dtype=np.float64).reshape(-1, 6)  # one routing unit per request
    boxes = rows[:, :4] * np.array([width, height, width, height])
    detections = [{"bbox": [round(float(v), 2) for v in box], "score": round(float(score), 4),
                   "category_id": int(cat), "category": COCO_NAMES.get(int(cat), str(int(cat)))}
                  for box, score, cat in zip(boxes, rows[:, 4], rows[:, 5])]
    return {"detections": detections, "width": width, "height": height}

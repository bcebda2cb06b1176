"""COCO mAP of a mixture with pycocotools' COCOeval, fast enough to run every gate epoch.

The mixture's detections are pooled: each image's detections come from the expert the gate
chose, and mAP is computed over all images at once. COCOeval.evaluate() matches detections to
ground truth image by image (evaluateImg depends on one image and one category only); only
accumulate() pools across images. So each (image, expert) is matched once, kept, and any
assignment is scored by picking each image's entries from its chosen expert and running
COCOeval.accumulate() on them: the same mAP@[.5:.95] and mAP@0.5 as COCOeval's stats[0] and
stats[1] on the pooled detections (tests check this against the plain sequence), in tens of
milliseconds instead of seconds. Only the reported area range ('all') and detection limit
(100 per image) are evaluated.

Ground truth and detections travel as bytes (Arrow-friendly, variable length):
  gt    float64 (G, 7): x, y, w, h, category_id, iscrowd, area (COCO's own fields, pixels)
  dets  float32 (D, 6): x, y, w, h, score, category_id (pixels of the original image)
"""

from __future__ import annotations

import contextlib
import copy
import io

import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval, Params

__all__ = ["GT_FIELDS", "DET_FIELDS", "pack", "unpack_gt", "unpack_dets", "coco_from_rows", "PooledCOCOEval",
           "coco_map"]

GT_FIELDS = 7
DET_FIELDS = 6
MAX_DETS = 100  # COCO's detections per image for the reported mAP


def _params(image_ids: list[int], categories: list[int]) -> Params:
    """COCOeval's bbox parameters restricted to what is reported (area 'all', 100 detections
    per image): the same mAP@[.5:.95] and mAP@0.5 as stats[0] and stats[1], 12x less work."""
    params = Params(iouType="bbox")
    params.imgIds, params.catIds = list(image_ids), list(categories)
    params.areaRng, params.areaRngLbl, params.maxDets = [params.areaRng[0]], ["all"], [MAX_DETS]
    return params


def pack(array: np.ndarray, dtype) -> bytes:
    return np.ascontiguousarray(array, dtype=dtype).tobytes()


def unpack_gt(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float64).reshape(-1, GT_FIELDS)


def unpack_dets(blob: bytes) -> np.ndarray:
    return np.frombuffer(blob, dtype=np.float32).reshape(-1, DET_FIELDS)


def coco_from_rows(image_ids, sizes, gts: list[np.ndarray], dets: list[np.ndarray] | None = None) -> COCO:
    """An in-memory COCO object: ground truth (dets=None) or detection results for the images."""
    images, annotations = [], []
    categories: set[int] = set()
    for image_id, (w, h), gt, det in zip(image_ids, sizes, gts, dets if dets is not None else gts):
        images.append({"id": int(image_id), "width": int(w), "height": int(h)})
        rows = gt if dets is None else det
        for r in rows:
            ann = {"id": len(annotations) + 1, "image_id": int(image_id), "bbox": [float(v) for v in r[:4]]}
            if dets is None:
                ann.update(category_id=int(r[4]), iscrowd=int(r[5]), area=float(r[6]))
            else:
                ann.update(score=float(r[4]), category_id=int(r[5]), iscrowd=0, area=float(r[2] * r[3]))
            categories.add(ann["category_id"])
            annotations.append(ann)
    coco = COCO()
    coco.dataset = {"images": images, "annotations": annotations,
                    "categories": [{"id": c} for c in sorted(categories)]}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


def _stats(evaluator: COCOeval) -> dict[str, float]:
    """mAP@[.5:.95] and mAP@0.5 from accumulate()'s precision table, as summarize() computes
    stats[0] and stats[1]; 0 where nothing has ground truth (COCOeval says -1)."""
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator.accumulate()
    precision = evaluator.eval["precision"][:, :, :, 0, -1]  # (T iou, R recall, K cat) at area all, 100 dets
    at50 = precision[evaluator.params.iouThrs == 0.5]

    def mean(p: np.ndarray) -> float:
        return float(p[p > -1].mean()) if (p > -1).any() else 0.0

    return {"map": mean(precision), "map50": mean(at50)}


class PooledCOCOEval:
    """COCOeval over pooled detections, with every (image, detections) matched only once."""

    def __init__(self):
        self._entries: dict[tuple, dict[int, dict]] = {}  # (image_id, gt, dets) -> {cat: evaluateImg entry}

    def _match(self, image_ids, sizes, gts: list[bytes], dets: list[bytes]) -> None:
        """COCOeval.evaluate() on images whose detections were not matched before."""
        todo = [i for i in range(len(image_ids)) if (image_ids[i], gts[i], dets[i]) not in self._entries]
        todo.sort(key=lambda i: image_ids[i])  # COCOeval orders evalImgs by sorted image id
        if not todo:
            return
        ids = [int(image_ids[i]) for i in todo]
        gt_arrays = [unpack_gt(gts[i]) for i in todo]
        det_arrays = [unpack_dets(dets[i]) for i in todo]
        ground = coco_from_rows(ids, [sizes[i] for i in todo], gt_arrays)
        found = coco_from_rows(ids, [sizes[i] for i in todo], gt_arrays, det_arrays)
        categories = sorted(set(ground.getCatIds()) | set(found.getCatIds()))
        evaluator = COCOeval(ground, found, "bbox")
        evaluator.params = _params(ids, categories)
        with contextlib.redirect_stdout(io.StringIO()):
            evaluator.evaluate()
        grid = np.array(evaluator.evalImgs, dtype=object).reshape(len(categories), len(ids))  # area 'all' only
        for j, i in enumerate(todo):
            self._entries[(image_ids[i], gts[i], dets[i])] = {
                c: grid[k, j] for k, c in enumerate(categories) if grid[k, j] is not None}

    def evaluate(self, image_ids, sizes, gts: list[bytes], dets: list[bytes]) -> dict[str, float]:
        """{'map': mAP@[.5:.95], 'map50': mAP@0.5} of these images with these detections.

        Args:
            image_ids: (M,) unique COCO image ids; sizes: M (width, height).
            gts, dets: M packed ground truths and detections (see the module docstring).
        """
        if len(image_ids) == 0:
            return {"map": float("nan"), "map50": float("nan")}
        image_ids = [int(i) for i in image_ids]
        self._match(image_ids, sizes, gts, dets)
        per_image = [self._entries[(image_ids[i], gts[i], dets[i])] for i in range(len(image_ids))]
        # the categories with ground truth: COCOeval leaves the others out of the mean (-1)
        categories = sorted({int(c) for g in gts for c in unpack_gt(g)[:, 4]})
        evaluator = COCOeval(iouType="bbox")
        evaluator.params = _params(image_ids, categories)
        evaluator._paramsEval = copy.deepcopy(evaluator.params)
        evaluator.evalImgs = [per_image[j].get(c) for c in categories for j in range(len(image_ids))]
        return _stats(evaluator)

def image_ap50(image_id: int, size, gt: bytes, dets: bytes) -> float:
    """AP@0.5 of one image on its own (0 where it has no ground truth). Its match is not
    kept: a scorer sees each image once, and keeping every match grew a cache actor by about
    50-100 KB per image (gigabytes over COCO)."""
    if unpack_gt(gt)[:, 5].min(initial=1) > 0:  # no ground truth, or crowds only
        return 0.0
    return PooledCOCOEval().evaluate([image_id], [size], [gt], [dets])["map50"]


def coco_map(ground: COCO, results: list[dict]) -> dict[str, float]:
    """The plain pycocotools sequence (loadRes, evaluate, accumulate, summarize) on a results
    list: the reference the pooled evaluation must agree with."""
    with contextlib.redirect_stdout(io.StringIO()):
        found = ground.loadRes(results) if results else COCO()
        if not results:
            found.dataset = {"images": ground.dataset["images"], "annotations": [], "categories": []}
            found.createIndex()
        evaluator = COCOeval(ground, found, "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    # no ground truth at all: COCOeval reports -1
    return {"map": max(float(evaluator.stats[0]), 0.0), "map50": max(float(evaluator.stats[1]), 0.0)}

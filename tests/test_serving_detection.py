"""The detection task's serving hooks without Serve: a request decodes into the gate input and
the P_n each expert saw in training (checked against DetectionTask.load on the same file), an
untrained expert answers through the wire format, the JSON response is in the original image's
pixels with COCO ids, and bad bodies are refused in one line."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from serving import wire
from tasks import get_task
from tasks.base import BadInput, InputTooSmall
from tasks.detection import metrics, serving, synthetic


def _encode(image: np.ndarray, fmt: str = "JPEG", **params) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _source(path, width: int, height: int) -> dict:
    return {"source_id": "1", "path": str(path), "image_id": 1, "width": width, "height": height, "anns": []}


@pytest.fixture(scope="module")
def scene_file(tmp_path_factory):
    """One synthetic 320x240 scene written as a JPEG file, as the task's embedded data is."""
    pixels, _, _ = synthetic.scene(np.random.default_rng(0), 320, 240, kind="mixed")
    path = tmp_path_factory.mktemp("scene") / "000000000001.jpg"
    path.write_bytes(_encode(pixels, quality=90))
    return path


@pytest.mark.parametrize("profile", ["smoke", "demo", "paper"])
def test_request_gate_and_p_n_equal_the_prepared_columns(profile, scene_file, samples):
    """What the gate and each expert get from a request is what they got from `prepare`."""
    task = get_task("detection", profile)
    s = task.settings
    files = [scene_file, *sorted((samples / "coco" / "val2017").glob("*.jpg"))[:2]]
    for path in files:
        with Image.open(path) as img:
            width, height = img.size
        row = task.load(_source(path, width, height))[0]
        request = task.decode_request(path.read_bytes())
        assert request.gate_input.shape == (1, s.gate_crop, s.gate_crop, 3) and request.gate_input.dtype == np.uint8
        assert np.array_equal(request.gate_input[0], row["gate"])
        assert request.full_wire_bytes == width * height * 3 and request.full_data_cost == width * height * 3 * s.K
        for n, r in enumerate(s.resolutions):
            x = task.request_inputs(request, n, np.array([0]))
            assert x.shape == (1, r, r, 3) and x.dtype == np.uint8
            assert np.array_equal(x[0], row[f"x{n}"])
            assert x[0].size * s.K == task.data_costs()[n]  # d_n = 3 R^2 K: what crosses is what is charged
        assert task.gate_tensor(request.gate_input).shape == (1, 3, s.gate_crop, s.gate_crop)


def test_untrained_expert_answers_through_the_wire(scene_file, one_thread):
    task = get_task("detection", "smoke")
    request = task.decode_request(scene_file.read_bytes())
    for n in range(len(task.settings.resolutions)):
        model = task.build_expert(n).eval()
        x = wire.decode(wire.encode([task.request_inputs(request, n, np.array([0]))]))[0]  # as the router sends it
        batch = np.concatenate([x, x[:, ::-1]])  # two images in one batch, as @serve.batch concatenates them
        outputs = task.serve_expert(n, model, batch, torch.device("cpu"))
        assert len(outputs) == 2
        back = wire.decode(wire.encode(outputs))  # what the expert sends back
        for out in back:
            assert out.dtype == np.float32 and out.ndim == 2 and out.shape[1] == 6
            assert np.all(out[:, :4] >= -1e-6) and np.all(out[:, :2] + out[:, 2:4] <= 1 + 1e-6)  # normalised
            assert np.all(np.diff(out[:, 4]) <= 0)  # best first
            assert set(out[:, 5].astype(int)) <= set(synthetic.CATEGORY_IDS)
        prediction = task.response(request, [back[0]])
        assert len(prediction["detections"]) == len(back[0])
        json.dumps(prediction)


def test_served_detections_are_the_ones_evaluate_cached(scene_file, one_thread):
    """The same expert on the same image gives the detections the cache scored (image pixels)."""
    task = get_task("detection", "demo")
    row = task.load(_source(scene_file, 320, 240))[0]
    torch.manual_seed(0)
    model = task.build_expert(1).eval()
    batch = {k: np.stack([row[k]]) for k in ("boxes", "labels", "img_w", "img_h", "image_id")}
    with torch.no_grad():  # as the pipeline's evaluation runs it
        cached = task.evaluate(1, model, {**batch, "x": np.stack([row["x1"]]), "gt": [row["gt"]]}, torch.device("cpu"))
    request = task.decode_request(scene_file.read_bytes())
    served = task.serve_expert(1, model, task.request_inputs(request, 1, np.array([0])), torch.device("cpu"))
    prediction = task.response(request, served)
    dets = metrics.unpack_dets(cached["dets"][0])  # (D, 6) xywh in image pixels, score, COCO id
    rows = np.array([[*d["bbox"], d["score"], d["category_id"]] for d in prediction["detections"]]).reshape(-1, 6)
    assert len(rows) == len(dets) > 0
    np.testing.assert_allclose(rows, dets[np.argsort(-dets[:, 4], kind="stable")], atol=0.01)  # 2-decimal JSON


def test_response_is_in_the_original_pixels_with_coco_ids():
    task = get_task("detection", "paper")
    request = task.decode_request(_encode(np.zeros((480, 640, 3), dtype=np.uint8), "PNG"))
    out = np.array([[0.5, 0.25, 0.25, 0.5, 0.9, 1.0], [0.0, 0.0, 1.0, 1.0, 0.3, 90.0]], dtype=np.float32)
    prediction = task.response(request, [out])
    assert prediction == {
        "detections": [{"bbox": [320.0, 120.0, 160.0, 240.0], "score": 0.9, "category_id": 1, "category": "person"},
                       {"bbox": [0.0, 0.0, 640.0, 480.0], "score": 0.3, "category_id": 90, "category": "toothbrush"}],
        "width": 640, "height": 480}
    assert json.loads(json.dumps(prediction)) == prediction
    empty = task.response(request, [np.zeros((0, 6), dtype=np.float32)])
    assert empty == {"detections": [], "width": 640, "height": 480}


def test_category_names_are_coco_s_own(samples):
    """The name table matches the real instances JSON and the synthetic scenes' categories."""
    from tasks.detection.task import COCO80

    real = json.loads((samples / "coco" / "annotations" / "instances_val2017.json").read_text())["categories"]
    assert {c["id"]: c["name"] for c in real} == serving.COCO_NAMES
    assert tuple(serving.COCO_NAMES) == COCO80
    assert all(serving.COCO_NAMES[c["id"]] == c["name"] for c in synthetic.CATEGORIES)


def test_exif_orientation_is_applied_so_boxes_fit_the_image_the_client_sees():
    image = np.random.default_rng(1).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    task = get_task("detection", "smoke")
    request = task.decode_request(_encode(image, "JPEG", exif=exif.tobytes()))
    prediction = task.response(request, [np.zeros((0, 6), dtype=np.float32)])
    assert (prediction["width"], prediction["height"]) == (40, 60)


def test_bad_bodies_are_refused_in_one_line():
    task = get_task("detection", "smoke")
    image = np.random.default_rng(2).integers(0, 255, (64, 80, 3), dtype=np.uint8)
    gif = _encode(image, "GIF")
    cases = [(b"", BadInput, "empty request body"), (b"GIF89a not an image", BadInput, "not a PNG or JPEG"),
             (_encode(image)[:300], BadInput, "not a readable PNG/JPEG"),
             (_encode(image, "PNG")[:300], BadInput, "not a readable PNG/JPEG"),
             (gif, BadInput, "GIF image; expected PNG or JPEG"),
             (_encode(image[:7]), InputTooSmall, "under 8 pixels a side"),
             (_encode(image[:, :5], "PNG"), InputTooSmall, "5x64 image")]
    for body, kind, message in cases:
        with pytest.raises(kind, match=message) as err:
            task.decode_request(body)
        assert "\n" not in str(err.value)
    assert task.decode_request(_encode(image[:8, :8], "PNG")).gate_input.shape == (1, 48, 48, 3)  # 8 px is enough
    gray = task.decode_request(_encode(image[:, :, 0], "PNG"))  # any mode decodes to RGB, as the reader does
    assert gray.gate_input.shape == (1, 48, 48, 3)

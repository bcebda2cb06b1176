"""The action task's serving hooks without Serve: a video body decodes into exactly the gate
input and P_n that training stored, untrained experts answer one probability vector per clip,
the response names the class, and bad bodies are one-line BadInput errors."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from serving import wire
from tasks import BadInput, get_task
from tasks.action import synthetic
from tasks.action.readers import read_class_index
from tasks.action.serving import UCF101_CLASSES, class_names
from tasks.base import InputTooSmall

ONE = np.array([0])


def _clip(tmp_path: Path, name: str, frames: int, codec: str = "mpeg4", cls: int = 0, gop: str = "12",
          seed: int = 0) -> Path:
    video = synthetic.render_clip(synthetic.CLASSES[cls], frames, 64, 80, np.random.default_rng(seed))
    if gop == "12":
        return synthetic.encode_clip(video, tmp_path / name, codec=codec)
    import av

    with av.open(str(tmp_path / name), mode="w") as container:  # GOP of 1: every frame intra-coded
        stream = container.add_stream(codec, rate=25)
        stream.height, stream.width, stream.pix_fmt = 64, 80, "yuv420p"
        stream.options = {"g": gop}
        for array in video:
            for packet in stream.encode(av.VideoFrame.from_ndarray(array, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return tmp_path / name


def _assert_as_trained(task, path: Path) -> None:
    """The request's gate input and every P_n equal what load() stores for the same file."""
    request = task.decode_request(path.read_bytes())
    row = task.load({"source_id": path.stem, "path": str(path), "label": 0, "group": "x_g01"})[0]
    assert request.gate_input.shape == (1, *row["gate"].shape) and request.gate_input.dtype == row["gate"].dtype
    assert np.array_equal(request.gate_input[0], row["gate"])
    for n in range(len(task.expert_names())):
        x = task.request_inputs(request, n, ONE)
        stored = np.asarray(row[f"x{n}"])
        assert x.shape == (1, *stored.shape) and x.dtype == stored.dtype, (n, x.shape, x.dtype)
        assert np.array_equal(x[0], stored)
    assert task.gate_tensor(request.gate_input).shape == (1, 2 * task.settings.F_t, 24, 24)
    assert request.full_data_cost == task.data_costs()[-1]  # one clip, every modality
    assert request.full_wire_bytes == row["x0"].nbytes + row["x1"].nbytes


def test_video_body_gives_the_training_inputs(tmp_path):
    task = get_task("action", "smoke")
    _assert_as_trained(task, _clip(tmp_path, "a.avi", task.clip_frames()))  # MPEG-4 part 2 in AVI, as UCF-101
    _assert_as_trained(task, _clip(tmp_path, "b.mp4", task.clip_frames(), codec="libx264"))  # H.264 in MP4
    # a clip with fewer motion frames than F_t is zero-padded, as training pads it: not InputTooSmall
    short = _clip(tmp_path, "short.avi", 3)
    _assert_as_trained(task, short)
    assert not task.decode_request(short.read_bytes()).gate_input[0, -1].any()


def test_real_ucf101_clip_and_class_names(samples):
    root = samples / "ucf101"
    if not (root / "UCF-101").is_dir():
        pytest.skip("no UCF-101 sample clip")
    assert list(UCF101_CLASSES) == read_class_index(root) == class_names(101)
    assert class_names(len(synthetic.CLASSES)) == [c.name for c in synthetic.CLASSES]
    clip = next((root / "UCF-101").glob("*/*.avi"))  # read in place
    _assert_as_trained(get_task("action", "smoke", {"classes": 101}), clip)


def test_untrained_experts_answer_and_the_response_names_the_class(tmp_path, one_thread):
    task = get_task("action", "smoke")
    requests = [task.decode_request(_clip(tmp_path, f"{k}.avi", task.clip_frames(), cls=k, seed=k).read_bytes())
                for k in range(2)]
    names = class_names(task.settings.classes)
    for n in range(len(task.expert_names())):
        model = task.build_expert(n).eval()
        # as the router sends it: both clips' P_n in one frame, read-only arrays on the other side
        x = wire.decode(wire.encode([np.concatenate([task.request_inputs(r, n, ONE) for r in requests])]))[0]
        outputs = task.serve_expert(n, model, x, torch.device("cpu"))
        assert len(outputs) == 2
        for out in outputs:
            assert out.shape == (task.settings.classes,) and out.dtype == np.float32
            assert abs(float(out.sum()) - 1.0) < 1e-5
        assert wire.decode(wire.encode(outputs))  # numeric: they cross back in the wire format
        body = task.response(requests[0], outputs[:1])
        body = json.loads(json.dumps(body))  # JSON-able as it is
        top = body["probabilities"]
        assert set(body) == {"label", "class_index", "probabilities"} and len(top) == 5
        assert body["label"] == names[body["class_index"]] == top[0]["label"]
        assert body["class_index"] == int(np.argmax(outputs[0]))
        assert all(names[p["class_index"]] == p["label"] for p in top)
        assert [p["probability"] for p in top] == sorted((p["probability"] for p in top), reverse=True)


def test_bad_bodies_are_one_line_bad_input(tmp_path):
    task = get_task("action", "smoke")
    good = _clip(tmp_path, "good.avi", task.clip_frames()).read_bytes()
    png = io.BytesIO()
    Image.fromarray(np.zeros((64, 80, 3), dtype=np.uint8)).save(png, format="PNG")
    intra = _clip(tmp_path, "intra.avi", 6, gop="1").read_bytes()
    cases = [(b"", "empty"), (b"GIF89a not a video at all", "not a readable video"),
             (good[:2000], "not a readable video"),  # truncated inside the container's header
             (png.getvalue(), "no motion vectors"), (intra, "no motion vectors")]
    for body, reason in cases:
        with pytest.raises(BadInput, match=reason) as info:
            task.decode_request(body)
        message = str(info.value)
        assert not isinstance(info.value, InputTooSmall)
        assert "\n" not in message and "bmoe-action-" not in message, message  # no temp path leaks

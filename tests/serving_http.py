"""Helpers of the HTTP serving tests: a run root each task can serve, request bodies in each
task's real format, and a client (urllib, threads) that counts status codes.

The run root is made the fast way: real `prepare` (the validation gate inputs the controller
calibrates on), experts at their initialisation and an untrained lagrange gate, in the files the
pipeline writes. Training them takes minutes and is tested in test_pipeline_*.py; serving does
not depend on how good they are.
"""

from __future__ import annotations

import io
import json
import socket
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from pipelines.runtime import RunConfig

TASKS = ("superres", "detection", "action")


def png(height: int, width: int, seed: int = 0, flat: bool = False) -> bytes:
    """A blocky PNG (some smooth areas, some edges), or one flat colour (tiny on disk, any size)."""
    rng = np.random.default_rng(seed)
    if flat:
        image = np.full((height, width, 3), 90, dtype=np.uint8)
    else:
        base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
        image = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def bodies(task: str, count: int, folder: Path) -> list[bytes]:
    """`count` request bodies in the task's real format: PNGs, JPEG scenes, MPEG-4 AVI clips."""
    if task == "superres":
        return [png(64, 128, seed=i) for i in range(count)]
    if task == "detection":
        from tasks.detection import synthetic

        out = []
        for i in range(min(count, 16)):
            pixels = synthetic.scene(np.random.default_rng(i), 320, 240)[0]
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90)
            out.append(buffer.getvalue())
        return [out[i % len(out)] for i in range(count)]
    from tasks import get_task
    from tasks.action import synthetic

    frames = get_task("action", "smoke").clip_frames()
    clips = []
    for i in range(min(count, 8)):
        video = synthetic.render_clip(synthetic.CLASSES[i % len(synthetic.CLASSES)], frames, 64, 80,
                                      np.random.default_rng(i))
        clips.append(synthetic.encode_clip(video, folder / f"clip{i}.avi").read_bytes())
    return [clips[i % len(clips)] for i in range(count)]


def make_run(root: Path, task_name: str) -> str:
    """A smoke run root of `task` holding prepared data, expert checkpoints and a saved gate;
    returns the gate file."""
    from bmoe.gating import build_gate
    from pipelines.gate_trial import gate_bundle, save_gate
    from pipelines.methods import TrialConfig
    from pipelines.prepare import prepare
    from storage import save_torch

    data = None
    if task_name == "superres":  # a tiny folder of real PNGs in the split-folder layout
        data = root / "images"
        for k, split in enumerate(("train", "val", "test")):
            (data / split).mkdir(parents=True)
            for i in range(3):
                (data / split / f"{split}{i}.png").write_bytes(png(128, 192, seed=100 * k + i))
    cfg = RunConfig(task_name=task_name, root=str(root), profile="smoke", data_root=str(data) if data else None)
    prepare(cfg)
    task = cfg.task()
    torch.manual_seed(0)
    for n in range(len(task.expert_names())):
        save_torch(task.build_expert(n).state_dict(), cfg.layout.weights(n))
    gate = build_gate(task.gate_spec(), 0.25)
    config = TrialConfig(task_name=task_name, profile="smoke", method="lagrange", targets=tuple(task.data_costs()),
                         batch_size=16, lr=1e-3, width=0.25)
    return str(save_gate(gate_bundle(gate, config, score_mean=-0.01, score_std=0.01), cfg.layout.gate_bundle("test", "lagrange")))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def call(url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    method = "POST" if body is not None else "GET"
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def load(url: str, bodies: list[bytes], concurrency: int, headers: dict | None = None, on_done=None) -> list[int]:
    """POST every body to url with `concurrency` threads; returns the status codes."""
    done = [0]
    lock = threading.Lock()

    def one(body: bytes) -> int:
        status, _ = call(url, body, headers)
        with lock:
            done[0] += 1
            if on_done:
                on_done(done[0])
        return status

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, bodies))


def running_replicas(app: str, prefix: str) -> int:
    """RUNNING replicas of the deployment of `app` whose name starts with `prefix`."""
    from ray import serve

    deployments = serve.status().applications[app].deployments
    name = next(k for k in deployments if k.startswith(prefix))
    return int(deployments[name].replica_states.get("RUNNING", 0))


"""The superres mixture served by Ray Serve, through real HTTP on 127.0.0.1: predict, stats,
bad inputs, the streaming budget over 200 requests, a bounded load run with a replica killed
mid-run, and autoscaling of the busiest expert up and back down (seen in serve.status()).

The run root is made the fast way: real `prepare` (the validation gate inputs the controller
calibrates on), experts at their initialisation (the residual ESPCN starts as a bicubic
upscaler) and an untrained lagrange gate, both in the files the pipeline writes. Training them
takes minutes here and is tested in test_pipeline_superres.py; serving does not depend on how
good they are. The full 2,000-request load run is bench/serve.py.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.runtime import RunConfig

pytestmark = pytest.mark.slow

D = np.array([3072.0, 64 * 64 / 9 * 12, 12288.0])
BUSY = 0  # the expert every unit goes to at target d_min: made the busiest on purpose


def make_run(root) -> str:
    """A smoke run root holding prepared data, expert checkpoints and a saved gate; returns the gate file."""
    from bmoe.gating import build_gate
    from pipelines.gate_trial import gate_bundle, save_gate
    from pipelines.prepare import prepare
    from storage import save_torch

    data = root / "images"  # a tiny folder of real PNGs in the split-folder layout
    for k, split in enumerate(("train", "val", "test")):
        (data / split).mkdir(parents=True)
        for i in range(3):
            (data / split / f"{split}{i}.png").write_bytes(png(128, 192, seed=100 * k + i))
    cfg = RunConfig(task="superres", root=str(root), profile="smoke", data_root=str(data))
    prepare(cfg)
    task = cfg.task_obj()
    torch.manual_seed(0)
    for n in range(len(task.expert_names())):
        save_torch(task.build_expert(n).state_dict(), cfg.layout.weights(n))
    gate = build_gate(task.gate_spec(), 0.25)
    config = {"task": "superres", "profile": "smoke", "options": {}, "method": "lagrange", "width": 0.25}
    path = cfg.layout.gate("test", "lagrange")
    return str(save_gate(gate_bundle(gate, config, score_mean=-0.01, score_std=0.01), path))


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("serve-run")
    return root, make_run(root)


@pytest.fixture(scope="module")
def server(run_root):
    from ray import serve

    from serving.app import run
    from serving.settings import ExpertScaling, ServeSettings

    root, gate_file = run_root
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Fast autoscaling for the test; fractional CPUs so up to 5 replicas fit on 2 cores.
    fast = ExpertScaling(min_replicas=1, max_replicas=2, target_ongoing_requests=1, upscale_delay_s=1,
                         downscale_delay_s=3, metrics_interval_s=0.5, look_back_period_s=2, num_cpus=0.2,
                         max_ongoing_requests=4, health_check_period_s=1)
    settings = ServeSettings(task="superres", root=str(root), gate_file=gate_file, target_cost=D.max() / 3,
                             max_body_bytes=200_000, retry_backoff_s=0.5, retries=6, router_cpus=0.2, expert=fast)
    run(settings, host="127.0.0.1", port=port, access_log=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def png(height: int, width: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8)
    image = np.kron(base, np.ones((8, 8, 1), dtype=np.uint8))[:height, :width]  # blocky: some smooth, some edges
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def call(url: str, body: bytes | None = None, headers: dict | None = None, timeout: float = 60) -> tuple[int, dict]:
    method = "POST" if body is not None else "GET"
    request = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def load(url: str, bodies: list[bytes], concurrency: int, headers: dict | None = None, on_done=None) -> list[int]:
    """POST every body with `concurrency` threads; returns the status codes."""
    done = [0]
    lock = threading.Lock()

    def one(body: bytes) -> int:
        status, _ = call(f"{url}/superres/predict", body, headers)
        with lock:
            done[0] += 1
            if on_done:
                on_done(done[0])
        return status

    with ThreadPoolExecutor(concurrency) as pool:
        return list(pool.map(one, bodies))


def running_replicas(n: int) -> int:
    from ray import serve

    app = serve.status().applications["superres"]
    name = next(k for k in app.deployments if k.startswith(f"superres-expert-{n}-"))
    return int(app.deployments[name].replica_states.get("RUNNING", 0))


def test_predict_returns_the_super_resolved_image_and_byte_accounting(server):
    status, out = call(f"{server}/superres/predict", png(150, 200))
    assert status == 200, out
    assert out["task"] == "superres" and len(out["experts"]) == 6  # 2 x 3 patches on the 64-px grid
    assert set(out["experts"]) <= {"espcn_x4", "espcn_x3", "espcn_x2"} and out["expert"] in out["experts"]
    image = Image.open(io.BytesIO(base64.b64decode(out["prediction"]["image_png_base64"])))
    assert image.size == (192, 128) and image.format == "PNG"
    by_name = dict(zip(["espcn_x4", "espcn_x3", "espcn_x2"], D))
    assert out["data_cost_bytes"] == pytest.approx(sum(by_name[e] for e in out["experts"]))
    assert out["full_data_cost_bytes"] == 6 * 64 * 64 * 3 * 4 > out["data_cost_bytes"]
    assert 0 < out["wire_bytes"] < 6 * 64 * 64 * 3  # LR uint8 patches plus a few header bytes
    assert out["latency_ms"] > 0
    status, health = call(f"{server}/superres/healthz")
    assert status == 200 and health["status"] == "ok"
    with urllib.request.urlopen(f"{server}/-/healthz", timeout=10) as response:
        assert response.status == 200


def test_bad_inputs_get_4xx_json_and_the_app_keeps_serving(server):
    good = png(64, 128)
    cases = [(b"", 400, "empty"), (b"this is not an image", 400, "not a PNG or JPEG"),
             (good[: len(good) // 2], 400, "not a readable"), (png(40, 300), 422, "smaller than one 64x64"),
             (b"\x89PNG" + b"\0" * 250_000, 413, "limit")]
    for body, code, message in cases:
        status, out = call(f"{server}/superres/predict", body)
        assert status == code and message in out["error"] and "\n" not in out["error"], (code, out)
    status, out = call(f"{server}/superres/predict?target_cost=99", good)
    assert status == 400 and "feasible range" in out["error"]
    status, out = call(f"{server}/superres/predict", good)
    assert status == 200, out
    status, stats = call(f"{server}/superres/stats")
    assert stats["errors"]["400"] >= 4 and stats["errors"]["413"] >= 1 and stats["errors"]["422"] >= 1


def test_streaming_budget_holds_over_200_requests_and_stats_report_it(server):
    target = D.max() / 3
    costs, units = [], []
    for i in range(200):  # one at a time: the controller's order is the request order
        status, out = call(f"{server}/superres/predict", png(64, 128, seed=i))
        assert status == 200, out
        costs.append(out["data_cost_bytes"])
        units.append(len(out["experts"]))
    mean = sum(costs) / sum(units)
    assert abs(mean - target) / target <= 0.05, mean
    status, stats = call(f"{server}/superres/stats")
    budget = stats["budget"]
    assert budget["target"] == pytest.approx(target) and budget["window_units"] == 200
    assert abs(budget["window_error"]) <= 0.05
    assert abs(budget["mean_data_cost"] - target) / target <= 0.05
    assert sum(e["units"] for e in stats["experts"].values()) == stats["units"]
    assert stats["bytes"]["data_cost_vs_full"] == pytest.approx(target / (64 * 64 * 3 * 4), rel=0.1)
    # requests may override the target: their own stream is held to it (50 x 4 patches = 200 units)
    high = 0.8 * D.max()
    spent = []
    for i in range(50):
        status, out = call(f"{server}/superres/predict", png(128, 128, seed=i),
                           headers={"X-BMoE-Target-Cost": str(high)})
        assert status == 200 and out["target_cost"] == high and len(out["experts"]) == 4
        spent.append(out["data_cost_bytes"])
    assert abs(sum(spent) / 200 - high) / high <= 0.05
    status, stats = call(f"{server}/superres/stats")
    assert stats["overrides"][f"{high:g}"]["units"] == 200 and stats["budget"]["units"] == budget["units"]


def test_load_with_an_expert_replica_killed_mid_run_loses_no_request(server):
    import ray

    bodies = [png(64, 128, seed=i) for i in range(240)]
    killed = []

    def kill_once(done: int) -> None:
        if done == 60 and not killed:
            names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True)
                     if f"superres-expert-{BUSY}-" in a["name"] and "SERVE_REPLICA" in a["name"]]
            ray.kill(ray.get_actor(names[0], namespace="serve"), no_restart=True)
            killed.append(names[0])

    statuses = load(server, bodies, concurrency=16, headers={"X-BMoE-Target-Cost": str(D.min())}, on_done=kill_once)
    assert killed, "no replica was killed"
    assert statuses.count(200) == len(bodies), {s: statuses.count(s) for s in set(statuses)}
    status, stats = call(f"{server}/superres/stats")
    assert status == 200 and stats["errors"].get("503", 0) == 0
    print(f"killed {killed[0]}; expert calls retried: {stats['retried_expert_calls']}")


def test_busiest_expert_scales_up_under_load_and_back_down_when_idle(server):
    bodies = [png(64, 128, seed=i) for i in range(48)]
    deadline = time.monotonic() + 60
    while running_replicas(BUSY) != 1 and time.monotonic() < deadline:  # idle after the previous test
        time.sleep(1)
    peak = running_replicas(BUSY)
    assert peak == 1
    while peak < 2 and time.monotonic() < deadline:  # bounded: rounds of 48 requests, 60 s at most
        statuses = load(server, bodies, concurrency=16, headers={"X-BMoE-Target-Cost": str(D.min())})
        assert all(s == 200 for s in statuses)
        peak = max(peak, running_replicas(BUSY))
    assert peak == 2, "the busiest expert never scaled up"
    assert running_replicas(2) == 1  # the idle expert stayed at its minimum
    deadline = time.monotonic() + 60
    while running_replicas(BUSY) > 1 and time.monotonic() < deadline:
        time.sleep(1)
    assert running_replicas(BUSY) == 1, "the expert did not scale back down when idle"
    status, out = call(f"{server}/superres/predict", png(64, 64))
    assert status == 200


def test_gate_and_experts_can_come_from_the_registry_as_plain_weights_only(run_root, tmp_path):
    """Registered versions (pipelines/registry.py) serve like the root's files; a pickled MLflow
    model or a weights file that unpickles code is refused in one line, and its code never runs."""
    import pickle

    import mlflow

    from pipelines import registry
    from pipelines.runtime import UserError
    from serving.loading import load_run
    from storage import load_torch

    root, gate_file = run_root
    cfg = RunConfig(task="superres", root=str(root), profile="smoke")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("serve-test")
    client = mlflow.MlflowClient(uri)
    with mlflow.start_run() as logged:
        for n in range(3):
            mlflow.log_artifact(str(cfg.layout.weights(n)), f"expert{n}")
        mlflow.log_artifact(str(gate_file), "gate")
    run_id = logged.info.run_id
    for n in range(3):
        registry.register(client, registry.expert_model("superres", n), run_id, f"expert{n}")
    version = registry.register(client, registry.gate_model("superres"), run_id, "gate", aliases=("best-enforce-d5000",))
    again = registry.register(client, registry.gate_model("superres"), run_id, "gate", aliases=("best-d5000",))
    assert again.version == version.version  # a rerun report moves aliases, adds no version
    uris = [f"models:/bmoe-superres-expert-{n}/1" for n in range(3)]
    models = load_run(root, "superres", "models:/bmoe-superres-gate@best-d5000", expert_uris=uris, tracking_uri=uri)
    checkpoints = load_run(root, "superres", gate_file)
    assert models.gate_target == 5000.0 and checkpoints.gate_target is None
    for a, b in zip(models.expert_states, checkpoints.expert_states):
        assert all(torch.equal(a[k], b[k]) for k in b)
    assert all(torch.equal(models.gate["state_dict"][k], v) for k, v in checkpoints.gate["state_dict"].items())
    with pytest.raises(UserError, match="weights do not fit"):
        load_run(root, "superres", gate_file, expert_uris=uris[::-1], tracking_uri=uri)
    with pytest.raises(UserError, match="has 3 experts"):
        load_run(root, "superres", gate_file, expert_uris=uris[:2], tracking_uri=uri)
    with pytest.raises(UserError, match="cannot download"):
        load_run(root, "superres", "models:/bmoe-superres-gate@best-d1", tracking_uri=uri)

    marker = tmp_path / "code-ran"
    planted = tmp_path / "planted"
    planted.mkdir()

    class Payload:
        def __reduce__(self):
            return (marker.write_text, ("yes",))

    (planted / "weights.pt").write_bytes(pickle.dumps(Payload()))
    model = cfg.task_obj().build_expert(0)
    model.load_state_dict(load_torch(cfg.layout.weights(0)))
    with mlflow.start_run() as attacker:
        mlflow.log_artifact(str(planted / "weights.pt"), "expert")
        mlflow.pytorch.log_model(model, name="pickled", serialization_format="pickle", pip_requirements=["torch"])
    for bad, said in ((f"runs:/{attacker.info.run_id}/expert", "not plain weights"),
                      (f"runs:/{attacker.info.run_id}/pickled", "never a pickled model")):
        with pytest.raises(UserError, match=said):
            load_run(root, "superres", gate_file, expert_uris=[bad, *uris[1:]], tracking_uri=uri)
    assert not marker.exists()

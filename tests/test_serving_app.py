"""The superres mixture served by Ray Serve, through real HTTP on 127.0.0.1: predict, stats,
bad inputs, the streaming budget over 200 requests, a heavy request that neither blocks the
router's health check nor a small request, the cap on units per request, what .bind() carries,
and models from the registry. Load, replica kills and autoscaling of every task:
test_serving_http.py. The run root is made as tests/serving_http.py says.
"""

from __future__ import annotations

import base64
import io
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.runtime import RunConfig
from serving_http import call, free_port, make_run, png

pytestmark = pytest.mark.slow

D = np.array([3072.0, 64 * 64 / 9 * 12, 12288.0])
MAX_UNITS = 2500  # a 3072x3072 image (2,304 patches) is served, a 4096x4096 one (4,096) refused


@pytest.fixture(scope="module")
def run_root(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("serve-run")
    return root, make_run(root, "superres")


@pytest.fixture(scope="module")
def settings(run_root):
    from serving.settings import ServeSettings

    root, gate_file = run_root
    return ServeSettings(task="superres", root=str(root), gate_file=gate_file, target_cost=D.max() / 3,
                         max_body_bytes=200_000, max_units=MAX_UNITS, chunk_units=128)


@pytest.fixture(scope="module")
def server(settings):
    from ray import serve

    from serving.app import run

    port = free_port()
    run(settings, host="127.0.0.1", port=port, access_log=False)
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


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
    status, out = call(f"{server}/superres/predict", good, headers={"X-BMoE-Target-Cost": "9" * 10_000})
    assert status == 400 and "(10000 characters)" in out["error"] and len(out["error"]) < 300, out  # not echoed whole
    status, out = call(f"{server}/superres/predict", good)
    assert status == 200, out
    status, out = call(f"{server}/superres/predict")  # GET where POST is wanted
    assert status == 405 and "takes POST" in out["error"], out
    status, out = call(f"{server}/superres/nowhere")
    assert status == 404 and "no route GET" in out["error"], out
    status, out = call(f"{server}/superres/detection/stats")  # the paths of an app mounted at /
    assert status == 404 and "serves superres, not detection" in out["error"], out
    status, health = call(f"{server}/superres/superres/healthz")
    assert status == 200 and health["task"] == "superres", health
    status, stats = call(f"{server}/superres/stats")
    assert stats["errors"]["400"] >= 4 and stats["errors"]["413"] >= 1 and stats["errors"]["422"] >= 1
    assert stats["errors"]["404"] >= 2 and stats["errors"]["405"] >= 1, stats["errors"]


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


def test_a_heavy_request_blocks_neither_health_checks_nor_a_small_request(server):
    """A flat 3072x3072 PNG (2,304 patches, 18 chunks) computes for seconds; meanwhile the
    router's health route and a small request are answered, since the work runs off the event loop."""
    small = png(64, 128, seed=7)
    idle = []
    for _ in range(5):
        started = time.perf_counter()
        assert call(f"{server}/superres/predict", small)[0] == 200
        idle.append(time.perf_counter() - started)
    heavy_body = png(3072, 3072, flat=True)
    with ThreadPoolExecutor(1) as pool:
        started = time.perf_counter()
        heavy = pool.submit(call, f"{server}/superres/predict", heavy_body)
        time.sleep(0.5)  # the heavy request is decoding or in its chunks by now
        during = []
        while not heavy.done() and len(during) < 20:
            t0 = time.perf_counter()
            status, health = call(f"{server}/superres/healthz")
            assert status == 200 and health["status"] == "ok"
            t1 = time.perf_counter()
            assert call(f"{server}/superres/predict", small)[0] == 200
            during.append((t1 - t0, time.perf_counter() - t1))
        status, out = heavy.result()
        heavy_s = time.perf_counter() - started
    assert status == 200 and len(out["experts"]) == 48 * 48, out.get("error")
    assert during, f"the heavy request took only {heavy_s:.2f} s: nothing ran beside it"
    health_s = max(h for h, _ in during)
    small_s = float(np.median([p for _, p in during]))
    print(f"heavy {heavy_s:.1f} s; beside it: health at most {1000 * health_s:.0f} ms, small request median "
          f"{1000 * small_s:.0f} ms (idle {1000 * np.median(idle):.0f} ms)")
    assert health_s < min(1.0, heavy_s / 2), (health_s, heavy_s)
    assert small_s < heavy_s / 2, (small_s, heavy_s)


def test_units_over_the_cap_are_refused_in_one_line(server):
    status, out = call(f"{server}/superres/predict", png(4096, 4096, flat=True))
    assert status == 413 and f"over the limit of {MAX_UNITS}" in out["error"] and "\n" not in out["error"], out
    assert call(f"{server}/superres/predict", png(64, 64))[0] == 200


def test_bind_carries_references_not_weights(settings):
    """Replicas load their own weights: every argument bound to every deployment of the app
    pickles to a few kilobytes at most (the experts' handles aside), where the experts' weights
    travelled before (the paper's SSD300 alone is 100 MB)."""
    import ray.cloudpickle as cloudpickle
    from ray.serve import Application

    from serving.app import build, resolve
    from serving.loading import load_expert

    served = resolve(settings)
    app = build(settings, served)
    bound, pending = {}, [app]
    while pending:
        deployment = pending.pop()._bound_deployment
        for k, arg in enumerate(deployment.init_args):
            children = [a for a in (arg if isinstance(arg, list) else [arg]) if isinstance(a, Application)]
            pending += children
            if not children:
                bound[f"{deployment.name}[{k}]"] = len(cloudpickle.dumps(arg))
    assert len(bound) == 3 + 3 * 4, bound  # the router's run, settings, target; each expert's 4 arguments
    weights = sum(len(cloudpickle.dumps(load_expert(served, n).state_dict())) for n in range(len(served.expert_names)))
    assert max(bound.values()) < 4096 < weights, (bound, weights)
    print(f"largest bound argument {max(bound.values())} bytes; the experts' weights {weights} bytes")


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
    cfg = RunConfig(task_name="superres", root=str(root), profile="smoke")
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
    assert all(torch.equal(models.gate_bundle["state_dict"][k], v) for k, v in checkpoints.gate_bundle["state_dict"].items())
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
    model = cfg.task().build_expert(0)
    model.load_state_dict(load_torch(cfg.layout.weights(0)))
    with mlflow.start_run() as attacker:
        mlflow.log_artifact(str(planted / "weights.pt"), "expert")
        mlflow.pytorch.log_model(model, name="pickled", serialization_format="pickle", pip_requirements=["torch"])
    for bad, said in ((f"runs:/{attacker.info.run_id}/expert", "not plain weights"),
                      (f"runs:/{attacker.info.run_id}/pickled", "never a pickled model")):
        with pytest.raises(UserError, match=said):
            load_run(root, "superres", gate_file, expert_uris=[bad, *uris[1:]], tracking_uri=uri)
    assert not marker.exists()


def test_a_replica_prices_with_the_validation_values_its_gate_was_saved_with(run_root, tmp_path):
    """A gate saved with its validation values (as the sweep saves it): a router replica takes
    them and reads no shard to start (the split's gate shards are moved away meanwhile); a gate
    saved without them still gets them computed from the split."""
    import shutil
    from pathlib import Path

    from serving.loading import load_gate, resolve_run
    from storage import load_torch, save_torch

    root, gate_file = run_root
    computed = load_gate(resolve_run(str(root), "superres", gate_file=gate_file))[2]
    assert computed.shape[1] == 3 and len(computed) > 0
    bundle = load_torch(Path(gate_file))
    saved = np.random.default_rng(0).normal(size=computed.shape)
    save_torch({**bundle, "val_values": torch.from_numpy(saved)}, tmp_path / "gate.pt")
    shards = RunConfig(task_name="superres", root=str(root)).layout.shards("val", "gate")
    shutil.move(shards, tmp_path / "moved")
    try:
        values = load_gate(resolve_run(str(root), "superres", gate_file=str(tmp_path / "gate.pt")))[2]
    finally:
        shutil.move(tmp_path / "moved", shards)
    assert np.array_equal(values, saved)

"""Serving parts that need no Serve: the streaming budget controller on long streams, the wire
format, the settings and the config YAML against Serve's own schema, the superres request hooks."""

from __future__ import annotations

import io
import json
import socket
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from serving import wire
from bmoe.budget import BudgetController, merge_summaries, window_bound
from serving.settings import ServeSettings

D = np.array([3072.0, 64 * 64 / 9 * 12, 12288.0])  # the superres experts' data costs (x4, x3, x2)
PROJECT = Path(__file__).resolve().parents[1]


def _windows(costs: np.ndarray, width: int) -> np.ndarray:
    """Mean of every run of `width` consecutive costs."""
    sums = np.convolve(costs, np.ones(width), mode="valid")
    return sums / width


def _stream(controller: BudgetController, values: np.ndarray) -> np.ndarray:
    routed = np.concatenate([controller.route(v[None]) for v in values])  # one unit at a time
    return D[routed]


@pytest.mark.parametrize("target", [D.max() / 3, D.max() / 2, 0.8 * D.max()])
def test_every_200_window_stays_within_5_percent_even_when_the_input_drifts(target):
    rng = np.random.default_rng(0)
    val = rng.normal(size=(400, 3)) + np.array([0.0, 0.5, 1.0])  # calibration: dearer experts look better
    controller = BudgetController.calibrated(D, target, val, window=200)
    # the stream drifts: first easy inputs (cheap experts look as good), then hard ones
    easy = rng.normal(size=(1500, 3)) + np.array([0.0, 0.1, 0.2])
    hard = rng.normal(size=(1500, 3)) + np.array([0.0, 2.0, 4.0])
    costs = _stream(controller, np.concatenate([easy, hard]))
    worst = np.abs(_windows(costs, 200) - target).max() / target
    assert worst <= 0.05, worst
    assert worst <= window_bound(D, target, 200) / target + 1e-9
    summary = controller.summary()
    assert summary["units"] == 3000 and abs(summary["window_mean_data_cost"] - target) / target <= 0.05
    # the gate still decides: routing is not a fixed rotation of experts
    assert len(np.unique(costs)) == 3


def test_controller_follows_the_gate_where_the_budget_allows():
    """With values that clearly prefer one expert per input and a target matching their mix,
    the controller keeps almost every gate choice (the band rarely overrides)."""
    rng = np.random.default_rng(1)
    pick = rng.integers(0, 3, size=3000)
    values = np.full((3000, 3), -5.0)
    values[np.arange(3000), pick] = 5.0
    target = float(D[pick].mean())
    controller = BudgetController.calibrated(D, target, values[:500], window=200)
    routed = np.concatenate([controller.route(v[None]) for v in values])
    assert (routed == pick).mean() > 0.9
    assert abs(D[routed].mean() - target) / target < 0.01


def test_the_stream_order_is_the_listing_s_whatever_order_the_rows_come_in():
    """bmoe.stream: a request's units stay together and in sample-id order, the requests'
    order depends on their keys and the seed only, so a cache and a listing holding the same
    requests in other orders stream them alike."""
    from bmoe.stream import request_order, stream_order

    keys = ["img-b", "img-a", "img-b", "img-c", "img-a", "img-b"]
    ids = ["img-b/2", "img-a/1", "img-b/1", "img-c/0", "img-a/0", "img-b/0"]
    order = stream_order(keys, ids)
    streamed = [ids[i] for i in order]
    for key in set(keys):  # each request contiguous, its units sorted
        at = [k for k, sid in enumerate(streamed) if sid.startswith(key)]
        assert at == list(range(at[0], at[0] + len(at))) and [streamed[k] for k in at] == sorted(streamed[k] for k in at)
    flipped = stream_order(keys[::-1], ids[::-1])
    assert [ids[::-1][i] for i in flipped] == streamed
    rank = request_order(keys)
    assert sorted(rank.values()) == [0, 1, 2] and [streamed[0].split("/")[0]] == [k for k, r in rank.items() if r == 0]
    assert len({tuple(request_order([f"k{i}" for i in range(20)], seed).items()) for seed in range(5)}) > 1


def test_the_streamed_assignment_is_the_controller_s_choice_in_stream_order():
    """What the report predicts for a deployment is what a fresh router's controller does when
    the same values arrive in the same order."""
    from bmoe.stream import streamed_assignment

    rng = np.random.default_rng(3)
    d, val, values = np.array([1024.0, 4096.0, 9216.0]), rng.normal(size=(300, 3)), rng.normal(size=(120, 3))
    order = rng.permutation(120)
    predicted = streamed_assignment(d, 4096.0, val, values, order, window=50)
    direct = BudgetController.calibrated(d, 4096.0, val, window=50).route(values[order])
    assert np.array_equal(predicted[order], direct)
    assert not np.array_equal(predicted, BudgetController.calibrated(d, 4096.0, val, window=50).route(values))


def test_target_outside_the_feasible_range_names_it():
    with pytest.raises(ValueError, match="outside"):
        BudgetController.calibrated(D, 100.0, np.zeros((10, 3)))


def test_wire_round_trip_and_malformed_frames():
    arrays = [np.arange(2 * 16 * 16 * 3, dtype=np.uint8).reshape(2, 16, 16, 3), np.linspace(0, 1, 7, dtype=np.float32)]
    frame = wire.encode(arrays)
    back = wire.decode(frame)
    assert all(np.array_equal(a, b) and a.dtype == b.dtype for a, b in zip(arrays, back))
    assert len(frame) - sum(a.nbytes for a in arrays) < 40  # compact: a few header bytes per array
    for bad, reason in [(b"", "magic"), (b"PK\x03\x04" + frame[4:], "magic"), (frame[:-1], "truncated"),
                        (frame + b"\0", "trailing"), (frame[:9], "truncated")]:
        with pytest.raises(wire.WireError, match=reason):
            wire.decode(bad)
    with pytest.raises(wire.WireError):
        wire.encode([np.array(["a", "b"], dtype=object)])  # no pickled objects on the wire


def test_settings_from_serve_args_and_errors():
    settings = ServeSettings.from_args({"task": "superres", "root": "/r", "target_cost": "4096", "bias": "",
                                        "expert": {"max_replicas": "3", "num_gpus": 0.5}})
    assert settings.target_cost == 4096.0 and settings.bias is None
    assert settings.scaling(2).max_replicas == 3 and settings.scaling(0).ray_actor_options()["num_gpus"] == 0.5
    with pytest.raises(ValueError, match="unknown serve argument"):
        ServeSettings.from_args({"taks": "superres"})
    with pytest.raises(ValueError, match="unknown expert scaling key"):
        ServeSettings.from_args({"expert": {"replicas": 2}})
    routed = ServeSettings.from_args({"router": {"max_replicas": "3"}, "max_units": "100", "chunk_units": 8})
    assert routed.router.max_replicas == 3 and routed.router.max_ongoing_requests == 64  # router defaults kept
    assert routed.max_units == 100 and routed.chunk_units == 8 and routed.expert.max_replicas == 4
    assert routed.router.deployment_options("r")["autoscaling_config"]["max_replicas"] == 3
    with pytest.raises(ValueError, match="unknown router scaling key"):
        ServeSettings.from_args({"router": {"threads": 2}})
    with pytest.raises(ValueError, match="chunk_units must be at least 1"):
        ServeSettings.from_args({"chunk_units": "0"})


def test_router_replicas_streams_merge_into_one_within_the_bounds():
    """R router replicas each hold their own stream; merged, the application's mean over all
    units is within sum(B) / U of the target and the merged window within the window bound."""
    rng = np.random.default_rng(3)
    target = D.max() / 3
    val = rng.normal(size=(400, 3)) + np.array([0.0, 0.5, 1.0])
    controllers = [BudgetController.calibrated(D, target, val, window=200) for _ in range(3)]
    spent = []
    for k, controller in enumerate(controllers):  # unequal loads, each its own input drift
        values = rng.normal(size=(300 + 250 * k, 3)) + np.array([0.0, 0.3 * k, 0.6 * k])
        spent.append(_stream(controller, values))
    merged = merge_summaries([c.summary() for c in controllers])
    units = sum(len(s) for s in spent)
    assert merged["replicas"] == 3 and merged["units"] == units and merged["window_units"] == 600
    assert merged["mean_data_cost"] == pytest.approx(np.concatenate(spent).mean())
    assert abs(merged["mean_data_cost"] - target) / target <= merged["guaranteed_mean_error"] < 0.05
    windows = np.concatenate([s[-200:] for s in spent])
    assert merged["window_mean_data_cost"] == pytest.approx(windows.mean())
    assert abs(merged["window_error"]) <= merged["guaranteed_window_error"] <= 0.05
    single = merge_summaries([controllers[0].summary()])
    assert single["mean_data_cost"] == pytest.approx(spent[0].mean()) and single["replicas"] == 1


def test_budget_target_from_cost_or_bias():
    from serving.app import budget_target

    assert budget_target(ServeSettings(), D) == D.max() / 2
    assert budget_target(ServeSettings(bias=(0.5, 0.0, 0.5)), D) == pytest.approx((D[0] + D[2]) / 2)
    with pytest.raises(ValueError, match="feasible range"):
        budget_target(ServeSettings(target_cost=20000.0), D)
    with pytest.raises(ValueError, match="summing to 1"):
        budget_target(ServeSettings(bias=(0.5, 0.6, 0.0)), D)


def test_serve_config_yaml_passes_serves_own_schema():
    from ray.serve.schema import ServeDeploySchema

    raw = yaml.safe_load((PROJECT / "serving" / "serve_config.yaml").read_text())
    config = ServeDeploySchema.model_validate(raw)
    assert config.http_options.host == "127.0.0.1"
    app = config.applications[0]
    assert app.import_path == "serving.app:build_app"
    module, _, attr = app.import_path.partition(":")
    assert callable(getattr(__import__(module, fromlist=[attr]), attr))
    settings = ServeSettings.from_args(app.args)  # every arg is one the builder knows
    assert settings.task == app.name and settings.expert.num_gpus > 0  # a GPU fraction on clusters


def _png(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=fmt)
    return buffer.getvalue()


def test_superres_request_hooks_decode_route_units_and_reject_bad_bytes():
    from tasks import get_task
    from tasks.base import BadInput, InputTooSmall

    task = get_task("superres", "smoke")
    image = np.random.default_rng(0).integers(0, 255, (150, 200, 3), dtype=np.uint8)
    request = task.decode_request(_png(image))
    assert request.gate_input.shape == (2 * 3, 64, 64, 3)  # 64-px grid: 2 rows x 3 columns
    assert np.array_equal(request.gate_input[0], image[:64, :64])
    lr = task.request_inputs(request, 0, np.array([1, 4]))  # x4: 16x16 LR patches of units 1 and 4
    assert lr.shape == (2, 16, 16, 3) and lr.dtype == np.uint8
    assert task.decode_request(_png(image, "JPEG")).gate_input.shape[0] == 6
    for body, kind in [(b"", BadInput), (b"GIF89a not an image", BadInput), (_png(image)[:300], BadInput),
                       (_png(image[:40, :200]), InputTooSmall)]:
        with pytest.raises(kind):
            task.decode_request(body)
    gif = io.BytesIO()
    Image.fromarray(image).save(gif, format="GIF")
    with pytest.raises(BadInput, match="GIF"):
        task.decode_request(gif.getvalue())


def test_serve_cli_without_a_run_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from cli.main import app

    out = CliRunner().invoke(app, ["serve", "--root", str(tmp_path)])
    assert out.exit_code == 1
    assert "run `bmoe sweep --task superres` first" in out.output and "Traceback" not in out.output


def test_the_served_gate_is_found_in_the_latest_sweep(tmp_path):
    from pipelines.layout import RunLayout
    from pipelines.runtime import UserError
    from serving.loading import find_gate_file

    layout = RunLayout.of(tmp_path, "superres")
    sweeps = tmp_path / "sweeps" / "superres"
    gates = sweeps / "s1" / "gates"
    gates.mkdir(parents=True)
    with pytest.raises(UserError, match="run `bmoe sweep --task superres` first"):
        find_gate_file(layout)

    def write(trials: list[dict]) -> None:
        (sweeps / "s1.json").write_text(json.dumps({"name": "s1", "trials": trials}))
        (sweeps / "latest.json").write_text(json.dumps({"name": "s1", "file": "sweeps/superres/s1.json"}))

    enforce = [{"config": {"method": "enforce", "d_target": t}, "val_performance": p,
                "gate_file": f"sweeps/superres/s1/gates/e{i}.pt"} for i, (t, p) in enumerate([(4096.0, 30.0), (8000.0, 31.0)])]
    write([{"config": {"method": "random"}, "gate_file": None}])
    with pytest.raises(UserError, match="saved no trained gate"):
        find_gate_file(layout)
    write(enforce)
    assert find_gate_file(layout, target=4500.0).name == "e0.pt"  # nearest target
    assert find_gate_file(layout, target=7000.0).name == "e1.pt"
    # the best on validation at the sweep's target nearest the served one, of every gate trained (as the report
    # picks): lagrange's points count at each target; an absolute path recorded by an older run, moved since, is found
    lagrange = {"config": {"method": "lagrange"}, "gate_file": "/elsewhere/sweeps/superres/s1/gates/l.pt",
                "points": [{"d_target": 4096.0, "val_objective": 29.5}, {"d_target": 8000.0, "val_objective": 31.5}]}
    write([*enforce, lagrange])
    assert find_gate_file(layout, target=4500.0).name == "e0.pt"  # enforce's 30.0 beats lagrange's 29.5 there
    assert find_gate_file(layout, target=7000.0) == gates / "l.pt"
    (tmp_path / "data" / "superres").mkdir(parents=True)
    (tmp_path / "data" / "superres" / "manifest.json").write_text(json.dumps({"data_costs": [3072.0, 12288.0]}))
    assert find_gate_file(layout) == gates / "l.pt"  # no target: d_max / 2 = 6144, nearest 8000

def test_replay_says_in_one_line_what_it_lacks(tmp_path):
    """`bmoe replay` on a root without a sweep, then at a port where nothing listens: one line each."""
    from typer.testing import CliRunner

    from cli.main import app

    out = CliRunner().invoke(app, ["replay", "--root", str(tmp_path), "--url", "http://127.0.0.1:9"])
    assert out.exit_code == 1 and "run `bmoe sweep --task superres`" in out.output and "Traceback" not in out.output
    sweeps = tmp_path / "sweeps" / "superres"
    sweeps.mkdir(parents=True)
    (sweeps / "s1.json").write_text(json.dumps({"name": "s1", "profile": "smoke", "trials": []}))
    (sweeps / "latest.json").write_text(json.dumps({"name": "s1", "file": "sweeps/superres/s1.json"}))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = CliRunner().invoke(app, ["replay", "--root", str(tmp_path), "--url", f"http://127.0.0.1:{port}"])
    assert out.exit_code == 1 and f"no endpoint at http://127.0.0.1:{port}/superres/stats" in out.output, out.output
    assert len([line for line in out.output.splitlines() if line.startswith("error:")]) == 1
    out = CliRunner().invoke(app, ["replay", "--root", str(tmp_path), "--split", "train"])
    assert out.exit_code == 1 and "--split 'train'" in out.output


def test_the_default_gate_is_chosen_for_the_budget_served(tmp_path):
    """--target-cost, else b . d of --bias (the manifest's d), else d_max / 2 (None here)."""
    from serving.app import default_gate_target

    (tmp_path / "data" / "superres").mkdir(parents=True)
    (tmp_path / "data" / "superres" / "manifest.json").write_text(json.dumps({"data_costs": [3072.0, 6144.0, 12288.0]}))
    base = dict(task="superres", root=str(tmp_path))
    assert default_gate_target(ServeSettings(**base, target_cost=5000.0)) == 5000.0
    assert default_gate_target(ServeSettings(**base, bias=(0.5, 0.25, 0.25))) == 0.5 * 3072 + 0.25 * 6144 + 0.25 * 12288
    assert default_gate_target(ServeSettings(**base)) is None

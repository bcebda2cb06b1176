"""Serving benchmark: the superres mixture on Ray Serve over HTTP on 127.0.0.1.

Why these numbers matter:

* latency p50/p99 and requests/s at concurrency 1 and 16: what a client of the Router sees,
  on this machine's cores, for whole Set5 images (each split into 64x64 patches, each patch
  routed by the gate and sent to one expert deployment);
* the overhead of the Serve composition: the same requests, the same models and the same
  routing code called in one process (decode, gate, controller, P_n, expert, PNG response),
  as a ratio of p50 latencies at concurrency 1; what the HTTP proxy, the Router and the
  DeploymentHandle hops cost;
* bytes per request at d_t = d_max / 3 against sending the full input: the data cost
  actually spent (K = 4 bytes per value, the paper's convention) and the wire bytes actually
  sent (uint8 LR patches and the frame headers), each over the full-resolution patches;
* the issue's load test: about 2,000 requests at concurrency 16 with zero 5xx.

The run root must hold a trained superres run (prepare, train-experts, cache, sweep with the
lagrange or enforce method); with --build the smoke pipeline makes one there first (minutes).

Run from the repository root:  .venv/bin/python bench/serve.py --root RUN [--build] [--quick]
Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import socket
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere
from pipelines.runtime import RunConfig, ensure_ray  # noqa: E402

SET5 = Path(__file__).resolve().parents[2] / "shared" / "samples" / "set5" / "HR"
RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"


def build_run(root: str) -> None:
    """The smoke pipeline up to a sweep with a saved lagrange gate (real Ray Train, Data, Tune)."""
    from pipelines.cache import cache
    from pipelines.prepare import prepare
    from pipelines.sweep import GRIDS, sweep, with_methods
    from pipelines.train_experts import train_experts

    cfg = RunConfig(task="superres", root=root, profile="smoke")
    prepare(cfg)
    train_experts(cfg)
    cache(cfg)
    sweep(cfg, with_methods(GRIDS["smoke"], "lagrange"), name="bench-serve")


def post(url: str, body: bytes) -> tuple[int, float, dict]:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            status, payload = response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        status, payload = err.code, {}
    return status, time.perf_counter() - started, payload


def run_load(url: str, bodies: list[bytes], concurrency: int) -> dict:
    """POST every body with `concurrency` client threads; latency percentiles and throughput."""
    lock = threading.Lock()
    records = []

    def one(body: bytes) -> None:
        status, seconds, payload = post(url, body)
        with lock:
            records.append((status, seconds, payload.get("data_cost_bytes"), payload.get("wire_bytes"),
                            payload.get("full_data_cost_bytes")))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    latency = np.array([r[1] for r in records]) * 1000.0
    statuses = [r[0] for r in records]
    return {"concurrency": concurrency, "requests": len(records), "seconds": round(wall, 2),
            "requests_per_s": round(len(records) / wall, 2),
            "p50_ms": round(float(np.percentile(latency, 50)), 2),
            "p99_ms": round(float(np.percentile(latency, 99)), 2),
            "status_counts": {str(s): statuses.count(s) for s in sorted(set(statuses))},
            "errors_5xx": sum(1 for s in statuses if s >= 500), "_records": records}


def in_process(models, bodies: list[bytes], target: float) -> dict:
    """The Router's work and the experts' work in one process, with no Serve in between."""
    import torch

    from serving.budget import BudgetController
    from serving.loading import gate_values
    from bmoe.gating import build_gate

    torch.set_num_threads(1)
    task = models.task_obj()
    gate = build_gate(task.gate_spec(), models.gate["width"])
    gate.load_state_dict(models.gate["state_dict"])
    gate.eval()
    experts = []
    for n, state in enumerate(models.expert_states):
        model = task.build_expert(n)
        model.load_state_dict(state)
        experts.append(model.eval())
    controller = BudgetController.calibrated(models.d, target, models.val_values)
    device = torch.device("cpu")
    times = []
    for body in bodies:
        started = time.perf_counter()
        served = task.decode_request(body)
        assignment = controller.route(gate_values(gate, models.gate, task.gate_tensor(served.gate)))
        outputs: list = [None] * len(assignment)
        for n in (int(k) for k in np.unique(assignment)):
            units = np.flatnonzero(assignment == n)
            results = task.serve_expert(n, experts[n], task.request_inputs(served, n, units), device)
            for unit, out in zip(units, results):
                outputs[unit] = out
        task.response(served, outputs, assignment)
        times.append(time.perf_counter() - started)
    latency = np.array(times) * 1000.0
    return {"requests": len(bodies), "p50_ms": round(float(np.percentile(latency, 50)), 2),
            "p99_ms": round(float(np.percentile(latency, 99)), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="run root with a trained superres run")
    parser.add_argument("--build", action="store_true", help="run the smoke pipeline into --root first")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a check, not a measurement)")
    args = parser.parse_args()

    from ray import serve

    from serving.app import run
    from serving.loading import load_run
    from serving.settings import ExpertScaling, ServeSettings

    ensure_ray(RunConfig(task="superres", root=args.root))
    if args.build:
        build_run(args.root)
    models = load_run(args.root, "superres")
    target = float(models.d.max()) / 3
    images = sorted(SET5.glob("*.png"))
    if not images:
        sys.exit(f"Set5 sample images not found under {SET5}")
    bodies = [p.read_bytes() for p in images]
    n1, n16, n_load = (20, 48, 200) if args.quick else (100, 400, 2000)

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = ServeSettings(task="superres", root=args.root, target_cost=target,
                             expert=ExpertScaling(min_replicas=1, max_replicas=2, num_cpus=0.25))
    started = time.perf_counter()
    run(settings, host="127.0.0.1", port=port, models=models, access_log=False)
    startup = time.perf_counter() - started
    url = f"http://127.0.0.1:{port}/superres/predict"
    try:
        for body in bodies:  # warm-up: every expert replica loaded and jitted
            post(url, body)
        c1 = run_load(url, [bodies[i % len(bodies)] for i in range(n1)], 1)
        c16 = run_load(url, [bodies[i % len(bodies)] for i in range(n16)], 16)
        load = run_load(url, [bodies[i % len(bodies)] for i in range(n_load)], 16)
        with urllib.request.urlopen(url.replace("/predict", "/stats"), timeout=30) as response:
            stats = json.loads(response.read())
    finally:
        serve.shutdown()
    local = in_process(models, [bodies[i % len(bodies)] for i in range(n1)], target)

    records = c1.pop("_records") + c16.pop("_records") + load.pop("_records")
    ok = [r for r in records if r[0] == 200]
    data_cost = sum(r[2] for r in ok)
    wire_sent = sum(r[3] for r in ok)
    full = sum(r[4] for r in ok)
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "quick": args.quick,
        "python": platform.python_version(),
        "cpus": __import__("os").cpu_count(),
        "images": [p.name for p in images],
        "gate": {"file": models.gate_file, "method": models.gate["method"]},
        "target_cost": target,
        "serve_startup_s": round(startup, 1),
        "concurrency_1": c1,
        "concurrency_16": c16,
        "load_2000": load,
        "in_process": local,
        "serve_overhead_ratio_p50": round(c1["p50_ms"] / local["p50_ms"], 2),
        "bytes": {
            "requests": len(ok),
            "data_cost_per_request": round(data_cost / len(ok), 1),
            "full_data_cost_per_request": round(full / len(ok), 1),
            "data_cost_vs_full": round(data_cost / full, 4),
            "wire_bytes_per_request": round(wire_sent / len(ok), 1),
            "full_wire_bytes_per_request": round(full / 4 / len(ok), 1),  # uint8 full patches
            "wire_vs_full": round(wire_sent / (full / 4), 4),
        },
        "router_stats": {"budget": stats["budget"], "experts": stats["experts"],
                         "retried_expert_calls": stats["retried_expert_calls"]},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"serve bench ({'quick' if args.quick else 'full'}), target {target:g} B/patch, gate {models.gate['method']}")
    for key in ("concurrency_1", "concurrency_16", "load_2000"):
        r = result[key]
        print(f"  {key:15s} {r['requests']:5d} req  p50 {r['p50_ms']:8.1f} ms  p99 {r['p99_ms']:8.1f} ms  "
              f"{r['requests_per_s']:6.1f} req/s  5xx {r['errors_5xx']}")
    print(f"  in one process   p50 {local['p50_ms']:.1f} ms -> Serve overhead x{result['serve_overhead_ratio_p50']}")
    b = result["bytes"]
    print(f"  bytes/request: data cost {b['data_cost_per_request']:.0f} of {b['full_data_cost_per_request']:.0f} "
          f"(x{b['data_cost_vs_full']}), wire {b['wire_bytes_per_request']:.0f} "
          f"of {b['full_wire_bytes_per_request']:.0f} (x{b['wire_vs_full']})")
    print(f"  budget: window mean {stats['budget']['window_mean_data_cost']:.0f} vs target {target:.0f} "
          f"({100 * stats['budget']['window_error']:+.2f}%)")
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()

"""Serving benchmark: every task's mixture on Ray Serve over HTTP on 127.0.0.1, against the
same gate and experts in one process.

Why these numbers matter:

* p50/p99 latency and requests/s at concurrency 1 and 16, with 1 and 2 router replicas: what a
  client sees on this machine's cores, for real inputs (Set5 PNGs, COCO JPEGs, a UCF-101 AVI);
* in one process (decode, gate, controller, P_n, expert, response; no Serve) at concurrency 1,
  and with 2 worker threads at concurrency 16: the cost of the Serve composition, as
  milliseconds per hop ((p50 Serve - p50 in-process) / hops; a request makes one hop to the
  router and one to the experts per chunk of units, whose calls to several experts run
  concurrently) and as a throughput ratio;
* the heavy request (superres): a flat 8000x8000 PNG (79 KB, 15,625 patches) sent while small
  requests run one at a time: their p50 beside it against their idle p50, and the peak memory of
  the router and expert replicas (VmHWM) before and after it;
* the load runs: 2,000 requests at concurrency 16 per task (fewer with --quick), zero 5xx;
* Serve's own floor on this machine: an ingress that echoes the body, alone (one HTTP hop) and
  calling an echo deployment (one handle hop more), the same client, no work at all.

The run root must hold a trained run of each task (`bmoe demo`, or prepare ... sweep with a
lagrange, enforce or soft gate).

Run from the repository root:  .venv/bin/python bench/serve.py --root RUN [--task T] [--quick]
Writes bench/results/serve.json.
"""

from __future__ import annotations

import argparse
import datetime
import io
import json
import os
import platform
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

SAMPLES = Path(__file__).resolve().parents[2] / "shared" / "samples"
RESULTS = Path(__file__).resolve().parent / "results" / "serve.json"
TASKS = ("superres", "detection", "action")


def sample_bodies(task: str) -> list[bytes]:
    """Real files of each task's format, read in place."""
    pattern = {"superres": "set5/HR/*.png", "detection": "coco/val2017/*.jpg", "action": "ucf101/UCF-101/*/*.avi"}
    files = sorted(SAMPLES.glob(pattern[task]))
    if not files:
        sys.exit(f"no {task} sample files under {SAMPLES} ({pattern[task]})")
    return [p.read_bytes() for p in files]


def flat_png(height: int, width: int) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (90, 90, 90)).save(buffer, format="PNG")
    return buffer.getvalue()


def crop_png(body: bytes, size: int) -> bytes:
    """The top-left size x size of a PNG: a small request (4 patches at 128)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(io.BytesIO(body)).convert("RGB").crop((0, 0, size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def post(url: str, body: bytes) -> tuple[int, float, dict]:
    started = time.perf_counter()
    request = urllib.request.Request(url, data=body, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=600) as response:
            status, payload = response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        status, payload = err.code, {}
    return status, time.perf_counter() - started, payload


def figures(seconds: list[float], wall: float, statuses: list[int] | None = None) -> dict:
    latency = np.array(seconds) * 1000.0
    out = {"requests": len(seconds), "seconds": round(wall, 2), "requests_per_s": round(len(seconds) / wall, 2),
           "p50_ms": round(float(np.percentile(latency, 50)), 2),
           "p99_ms": round(float(np.percentile(latency, 99)), 2)}
    if statuses is not None:
        out["status_counts"] = {str(s): statuses.count(s) for s in sorted(set(statuses))}
        out["errors_5xx"] = sum(1 for s in statuses if s >= 500)
    return out


def run_load(url: str, bodies: list[bytes], concurrency: int) -> tuple[dict, list[dict]]:
    """POST every body with `concurrency` client threads: figures, and the 200 responses."""
    lock = threading.Lock()
    records = []

    def one(body: bytes) -> None:
        status, seconds, payload = post(url, body)
        with lock:
            records.append((status, seconds, payload))

    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        list(pool.map(one, bodies))
    wall = time.perf_counter() - started
    return ({"concurrency": concurrency, **figures([r[1] for r in records], wall, [r[0] for r in records])},
            [r[2] for r in records if r[0] == 200])


class InProcess:
    """The router's and the experts' work in one process, with no Serve in between; `workers`
    threads serve requests concurrently (torch on one thread each, as the replicas run)."""

    def __init__(self, models, target: float, chunk_units: int):
        import torch

        from bmoe.gating import build_gate
        from bmoe.budget import BudgetController

        torch.set_num_threads(1)
        self.models = models
        self.task = models.task()
        self.gate = build_gate(self.task.gate_spec(), models.gate_bundle["width"])
        self.gate.load_state_dict(models.gate_bundle["state_dict"])
        self.gate.eval()
        self.experts = []
        for n, state in enumerate(models.expert_states):
            model = self.task.build_expert(n)
            model.load_state_dict(state)
            self.experts.append(model.eval())
        self.controller = BudgetController.calibrated(models.d, target, models.val_values)
        self.lock = threading.Lock()
        self.chunk_units = chunk_units
        self.device = torch.device("cpu")

    def predict(self, body: bytes) -> dict:
        from serving.loading import gate_values

        task = self.task
        served = task.decode_request(body)
        count = len(served.gate_input)
        assignment = np.empty(count, dtype=np.int64)
        outputs: list = [None] * count
        for start in range(0, count, self.chunk_units):
            units = np.arange(start, min(start + self.chunk_units, count))
            values = gate_values(self.gate, self.models.gate_bundle, task.gate_tensor(served.gate_input[units]))
            with self.lock:
                routed = self.controller.route(values)
            assignment[units] = routed
            for n in np.unique(routed):
                chosen = units[routed == n]
                results = task.serve_expert(int(n), self.experts[n], task.request_inputs(served, int(n), chosen),
                                            self.device)
                for unit, out in zip(chosen, results):
                    outputs[unit] = out
        return task.response(served, outputs)

    def load(self, bodies: list[bytes], workers: int) -> dict:
        times = []
        lock = threading.Lock()

        def one(body: bytes) -> None:
            started = time.perf_counter()
            self.predict(body)
            with lock:
                times.append(time.perf_counter() - started)

        started = time.perf_counter()
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(one, bodies))
        return {"workers": workers, **figures(times, time.perf_counter() - started)}


def replica_memory(task: str) -> dict[str, float]:
    """Peak and current resident memory (MB) of this task's Serve replica processes, by deployment."""
    import psutil

    out = {}
    for proc in psutil.process_iter(["pid", "cmdline"]):
        title = " ".join(proc.info["cmdline"] or [])
        marker = f"ServeReplica:{task}:"
        if marker not in title:
            continue
        name = title.split(marker, 1)[1].split()[0]
        try:
            status = Path(f"/proc/{proc.info['pid']}/status").read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        key = name if name not in out else f"{name}#{proc.info['pid']}"
        out[key] = {"peak_mb": round(int(fields["VmHWM"].split()[0]) / 1024, 1),
                    "rss_mb": round(int(fields["VmRSS"].split()[0]) / 1024, 1)}
    return out


def heavy_case(url: str, small: bytes, n_small: int) -> dict:
    """Small requests one at a time, idle and beside a flat 8000x8000 PNG."""
    task = url.rstrip("/").split("/")[-2]
    idle = [post(url, small)[1] for _ in range(n_small)]
    before = replica_memory(task)
    heavy = flat_png(8000, 8000)
    result: dict = {}

    def send_heavy() -> None:
        status, seconds, payload = post(url, heavy)
        result.update(status=status, seconds=round(seconds, 1), units=len(payload.get("experts", [])),
                      error=payload.get("error"))

    thread = threading.Thread(target=send_heavy)
    thread.start()
    time.sleep(0.5)
    beside = []
    while thread.is_alive() and len(beside) < 2000:  # bounded: the heavy request ends first
        beside.append(post(url, small)[1])
    thread.join()
    after = replica_memory(task)
    idle_p50 = float(np.percentile(idle, 50)) * 1000
    beside_p50 = float(np.percentile(beside, 50)) * 1000 if beside else None
    return {"heavy_body_bytes": len(heavy), "heavy": result, "small_idle_p50_ms": round(idle_p50, 1),
            "small_beside_heavy_p50_ms": round(beside_p50, 1) if beside_p50 else None,
            "small_beside_heavy_requests": len(beside),
            "beside_over_idle": round(beside_p50 / idle_p50, 2) if beside_p50 else None,
            "replica_memory_before": before, "replica_memory_after": after}


def serve_floor(n1: int, n16: int) -> dict:
    """p50 at concurrency 1 and requests/s at 16 of an echo ingress, alone and with one handle hop
    to an echo deployment: what Serve and the client cost here before any work."""
    from ray import serve
    from starlette.requests import Request

    @serve.deployment(max_ongoing_requests=64)
    class Echo:
        async def __call__(self, body: bytes) -> bytes:
            return body

    @serve.deployment(max_ongoing_requests=64)
    class EchoIngress:
        def __init__(self, inner=None):
            self.inner = inner

        async def __call__(self, request: Request) -> dict:
            body = await request.body()
            if self.inner is not None:
                body = await self.inner.remote(body)
            return {"bytes": len(body)}

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    body = b"x" * 30_000  # about a detection P_n frame
    out = {}
    try:
        for name, app in (("http_hop", EchoIngress.bind()), ("http_and_handle_hop", EchoIngress.bind(Echo.bind()))):
            serve.run(app, name="echo", route_prefix="/echo",
                      logging_config={"enable_access_log": False, "log_level": "WARNING"})
            url = f"http://127.0.0.1:{port}/echo"
            for _ in range(20):
                post(url, body)
            c1, _ = run_load(url, [body] * n1 * 2, 1)
            c16, _ = run_load(url, [body] * n16 * 2, 16)
            out[name] = {"p50_ms": c1["p50_ms"], "requests_per_s_c16": c16["requests_per_s"]}
            serve.delete("echo")
    finally:
        serve.shutdown()
    out["handle_hop_p50_ms"] = round(out["http_and_handle_hop"]["p50_ms"] - out["http_hop"]["p50_ms"], 2)
    return out


def expert_rounds(payload: dict, chunk_units: int) -> int:
    """Sequential router-to-expert rounds of one request: its chunks (calls within one run concurrently)."""
    return -(-len(payload["experts"]) // chunk_units)


def bench_task(task: str, root: str, quick: bool) -> dict:
    from ray import serve

    from serving.app import run
    from serving.loading import load_run
    from serving.settings import Scaling, ServeSettings

    models = load_run(root, task)
    target = float(models.d.max()) / 3 if task == "superres" else float(models.d.max()) / 2
    bodies = sample_bodies(task)
    n1, n16, n_load = (10, 48, 200) if quick else (40, 200, 2000)
    out: dict = {"task": task, "gate": {"file": models.run.gate_file, "method": models.gate_bundle["method"]},
                 "target_cost": target, "inputs": len(bodies), "serve": {}}
    url = None
    for routers in (1, 2):
        port = _free_port()
        settings = ServeSettings(task=task, root=root, target_cost=target,
                                 router=Scaling(min_replicas=routers, max_replicas=routers, max_ongoing_requests=64),
                                 expert=Scaling(min_replicas=1, max_replicas=2, num_cpus=0.25))
        started = time.perf_counter()
        run(settings, host="127.0.0.1", port=port, served=models.run, access_log=False)
        case = {"startup_s": round(time.perf_counter() - started, 1)}
        url = f"http://127.0.0.1:{port}/{task}/predict"
        try:
            for body in bodies * 2:  # warm-up: every replica loaded, every expert used
                post(url, body)
            case["concurrency_1"], replies = run_load(url, [bodies[i % len(bodies)] for i in range(n1)], 1)
            case["expert_rounds_per_request"] = float(np.mean([expert_rounds(p, settings.chunk_units)
                                                               for p in replies]))
            case["concurrency_16"], _ = run_load(url, [bodies[i % len(bodies)] for i in range(n16)], 16)
            if routers == 2:
                case["load"], replies = run_load(url, [bodies[i % len(bodies)] for i in range(n_load)], 16)
                case["bytes"] = _bytes(replies)
            if routers == 1 and task == "superres":
                out["heavy"] = heavy_case(url, crop_png(bodies[0], 128), 20 if quick else 40)
            with urllib.request.urlopen(url.replace("/predict", "/stats"), timeout=60) as response:
                stats = json.loads(response.read())
            case["budget"] = stats["budget"]
            case["retried_expert_calls"] = stats["retried_expert_calls"]
        finally:
            serve.shutdown()
        out["serve"][f"routers_{routers}"] = case

    local = InProcess(models, target, ServeSettings().chunk_units)
    for body in bodies:
        local.predict(body)
    out["in_process_1"] = local.load([bodies[i % len(bodies)] for i in range(n1)], 1)
    out["in_process_2"] = local.load([bodies[i % len(bodies)] for i in range(n16)], 2)
    one = out["serve"]["routers_1"]
    hops = 1 + one["expert_rounds_per_request"]
    out["overhead_ms_per_hop_p50"] = round((one["concurrency_1"]["p50_ms"] - out["in_process_1"]["p50_ms"]) / hops, 2)
    best = max(out["serve"][k]["concurrency_16"]["requests_per_s"] for k in out["serve"])
    out["throughput_c16_vs_in_process_2"] = round(best / out["in_process_2"]["requests_per_s"], 2)
    return out


def _bytes(replies: list[dict]) -> dict:
    data_cost = sum(r["data_cost_bytes"] for r in replies)
    full = sum(r["full_data_cost_bytes"] for r in replies)
    return {"requests": len(replies), "data_cost_per_request": round(data_cost / len(replies), 1),
            "data_cost_vs_full": round(data_cost / full, 4),
            "wire_bytes_per_request": round(sum(r["wire_bytes"] for r in replies) / len(replies), 1)}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--root", required=True, help="run root with a trained run of each task (`bmoe demo`)")
    parser.add_argument("--task", action="append", choices=TASKS, help="repeatable; default: every task")
    parser.add_argument("--quick", action="store_true", help="fewer requests (a check, not a measurement)")
    args = parser.parse_args()

    ensure_ray(RunConfig(task_name="superres", root=args.root))
    result = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "quick": args.quick, "python": platform.python_version(), "cpus": os.cpu_count(),
              "load_average_before": os.getloadavg(), "tasks": {}}
    n1, n16 = (10, 48) if args.quick else (40, 200)
    floor = result["serve_floor"] = serve_floor(n1, n16)
    print(f"Serve's floor here (echo, no work): HTTP hop p50 {floor['http_hop']['p50_ms']} ms "
          f"({floor['http_hop']['requests_per_s_c16']} req/s at c16), a handle hop more "
          f"+{floor['handle_hop_p50_ms']} ms ({floor['http_and_handle_hop']['requests_per_s_c16']} req/s)")
    for task in args.task or TASKS:
        r = bench_task(task, args.root, args.quick)
        result["tasks"][task] = r
        print(f"{task}: gate {r['gate']['method']}, target {r['target_cost']:g} B/unit")
        for name, case in r["serve"].items():
            for key in ("concurrency_1", "concurrency_16", "load"):
                if key in case:
                    c = case[key]
                    print(f"  serve {name:10s} {key:15s} {c['requests']:5d} req  p50 {c['p50_ms']:8.1f} ms  "
                          f"p99 {c['p99_ms']:8.1f} ms  {c['requests_per_s']:6.1f} req/s  5xx {c['errors_5xx']}")
        for key in ("in_process_1", "in_process_2"):
            c = r[key]
            print(f"  in one process, {c['workers']} worker(s)  {c['requests']:5d} req  p50 {c['p50_ms']:8.1f} ms  "
                  f"p99 {c['p99_ms']:8.1f} ms  {c['requests_per_s']:6.1f} req/s")
        print(f"  overhead per hop (p50): {r['overhead_ms_per_hop_p50']} ms; throughput at c16 vs in-process "
              f"2 workers: x{r['throughput_c16_vs_in_process_2']}")
        if "heavy" in r:
            h = r["heavy"]
            print(f"  8000x8000 PNG: {h['heavy']}; small request p50 {h['small_idle_p50_ms']} ms idle, "
                  f"{h['small_beside_heavy_p50_ms']} ms beside it (x{h['beside_over_idle']})")
            print(f"  replica peak memory MB before {h['replica_memory_before']}")
            print(f"                         after  {h['replica_memory_after']}")
    result["load_average_after"] = os.getloadavg()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2))
    print(f"-> {RESULTS}")


if __name__ == "__main__":
    main()

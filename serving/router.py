"""The ingress deployment: the sensor side of the mixture (the paper's Fig. 2).

For each request it decodes the body into routing units, runs the gate on the full input,
routes every unit with the streaming budget controller, makes P_n of each unit on the sensor
and sends only that, in the wire format, to the chosen expert's deployment, then assembles the
task's JSON prediction. It counts bytes: the data cost spent (K bytes per value, the paper's
convention), the wire bytes actually sent, and what sending every full input would have cost.

The event loop only reads bodies and awaits: decoding, the gate, P_n, encoding and the
response run in a small thread pool, so health checks and small requests are answered while
a heavy one computes. A request's units go through the gate and the experts `chunk_units` at a
time, so their working memory is one chunk's whatever the input's size; the decoded input and
the assembled output are bounded by the task's pixel limit and `max_units`.

The router autoscales. Each replica holds its own budget stream at d_t, so the application's
mean over any set of replicas' windows is a mean of means each within tolerance; /stats
collects every replica's counters (DeploymentHandle.broadcast) and reports the sum and each.

Routes are a FastAPI ingress: POST /predict, GET /stats and GET /healthz under the app's route
prefix (`bmoe serve` mounts each task's app at /<task>), or under /<task>/ where the app is
mounted at / (the RayService's config). Refusals are JSON {"error", "status"}, counted in /stats.
"""

# No `from __future__ import annotations`: Serve rebuilds the routes' signatures from their live
# annotations, and a string "Request" would make FastAPI read the request from the query.
import asyncio
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving import wire
from bmoe.budget import BudgetController, merge_summaries
from serving.loading import ServedRun, gate_values, load_gate, replica_device
from serving.settings import ServeSettings

TARGET_HEADER = "x-bmoe-target-cost"
TARGET_QUERY = "target_cost"
MAX_OVERRIDE_STREAMS = 16  # per-target controllers kept for requests that override the target
_RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)


class HTTPError(Exception):
    """A request the router refuses: status code and a one-line reason."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# The module's helpers come before the Router: Serve pickles the ingress class when it is
# decorated, with the names its methods use as they are then (a helper defined below it is missing
# on the replica).


def aggregate_stats(snapshots: list[dict], run: ServedRun, d: np.ndarray, names: list[str]) -> dict:
    """/stats of the application from its router replicas' snapshots."""
    units = np.sum([s["units"] for s in snapshots], axis=0)
    requests = np.sum([s["expert_requests"] for s in snapshots], axis=0)
    in_flight = np.sum([s["in_flight"] for s in snapshots], axis=0)
    errors, totals = Counter(), Counter()
    for s in snapshots:
        errors.update(s["errors"])
        totals.update(s["bytes"])
    total = int(units.sum())
    targets = sorted({t for s in snapshots for t in s["overrides"]})
    return {
        "task": run.task_name,
        "router_replicas": len(snapshots),
        "uptime_s": max(s["uptime_s"] for s in snapshots),
        "requests": sum(s["requests"] for s in snapshots),
        "units": total,
        "errors": dict(sorted(errors.items())),
        "retried_expert_calls": sum(s["retried_expert_calls"] for s in snapshots),
        "experts": {name: {"data_cost_bytes": float(d[n]), "units": int(units[n]),
                           "utilisation": units[n] / total if total else 0.0,
                           "requests": int(requests[n]), "in_flight": int(in_flight[n])}
                    for n, name in enumerate(names)},
        "budget": merge_summaries([s["budget"] for s in snapshots]),
        "overrides": {t: merge_summaries([s["overrides"][t] for s in snapshots if t in s["overrides"]])
                      for t in targets},
        "bytes": {**{k: float(v) for k, v in totals.items()},
                  "data_cost_vs_full": _ratio(totals["data_cost"], totals["full_data_cost"]),
                  "wire_vs_full": _ratio(totals["wire_sent"], totals["full_wire"])},
        "per_replica": {s["replica"]: {"requests": s["requests"], "budget": s["budget"]} for s in snapshots},
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _running_replicas() -> dict[str, int]:
    """RUNNING replicas per deployment of this app, from Serve's controller (autoscaling at work)."""
    try:
        app = serve.status().applications[serve.get_replica_context().app_name]
        return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items()}
    except Exception as err:  # noqa: BLE001 - stats must answer even if the controller is busy
        return {"unavailable": str(err)}


api = FastAPI(title="bmoe router", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(StarletteHTTPException)
async def _no_route(request: Request, err: StarletteHTTPException) -> JSONResponse:
    """FastAPI's own 404 and 405, in the router's error shape and counted in /stats."""
    path = request.url.path
    if err.status_code == 405 and path.rstrip("/").endswith("/predict"):
        message = f"{path} takes POST with the raw bytes of an input file"
    elif err.status_code in (404, 405):
        message = f"no route {request.method} {path}; try POST <prefix>/predict, GET <prefix>/stats"
    else:
        message = str(err.detail)
    return serve.get_replica_context().servable_object.refuse(err.status_code, message)


@serve.deployment
@serve.ingress(api)
class Router:
    """Gate, budget controller, P_n and byte accounting; experts[n] is expert n's handle."""

    def __init__(self, run: ServedRun, settings: ServeSettings, target: float, experts: list):
        import torch

        torch.set_num_threads(1)  # the pool's threads share the node's cores
        self.run = run
        self.settings = settings
        self.task = run.task()
        self.names = list(run.expert_names)
        self.d = run.costs
        self.experts = experts
        self.device = replica_device()  # the gate runs on a GPU only when Ray gave the replica one
        self.gate, self.gate_bundle, self.val_values = load_gate(run, self.device)  # this replica's own copy
        self.pool = ThreadPoolExecutor(settings.router_threads, thread_name_prefix="router")
        self.lock = threading.Lock()  # controllers and counters: the pool's threads update them
        self.target = float(target)
        self.controllers: dict[float, BudgetController] = {self.target: self._calibrate(self.target)}
        self.started = time.time()
        self.requests = 0
        self.errors: Counter = Counter()
        self.units = np.zeros(len(self.d), dtype=np.int64)
        self.expert_requests = np.zeros(len(self.d), dtype=np.int64)
        self.in_flight = np.zeros(len(self.d), dtype=np.int64)
        self.retried = 0
        self.bytes = Counter()  # data_cost, full_data_cost, wire_sent, full_wire

    def _calibrate(self, target: float) -> BudgetController:
        return BudgetController.calibrated(self.d, target, self.val_values, window=self.settings.window)

    def check_health(self) -> None:
        """Serve's periodic health check: answered at once, the loop never computes."""
        if self.pool._shutdown:  # noqa: SLF001 - a pool that cannot run work is a dead replica
            raise RuntimeError("the router's thread pool is shut down")

    # -- HTTP: FastAPI routes, mounted at /<task> (`bmoe serve`) or at / (a RayService) ----------
    @api.post("/predict")
    @api.post("/{task}/predict")
    async def post_predict(self, request: Request, task: str = "") -> JSONResponse:
        return await self._answer(task, self.predict(request))

    @api.get("/stats")
    @api.get("/{task}/stats")
    async def get_stats(self, task: str = "") -> JSONResponse:
        return await self._answer(task, self.stats())

    @api.get("/healthz")
    @api.get("/{task}/healthz")
    @api.get("/-/healthz")
    async def get_healthz(self, task: str = "") -> JSONResponse:
        return await self._answer(task, self.health())

    async def _answer(self, task: str, work) -> JSONResponse:
        """The route's JSON, or a refusal as {"error", "status"}; a path naming another task is 404."""
        try:
            if task not in ("", self.run.task_name):
                work.close()
                raise HTTPError(404, f"this application serves {self.run.task_name}, not {task}")
            return JSONResponse(await work)
        except HTTPError as err:
            return self.refuse(err.status, str(err))

    def refuse(self, status: int, message: str) -> JSONResponse:
        with self.lock:
            self.errors[status] += 1
        return JSONResponse({"error": message, "status": status}, status_code=status)

    async def health(self) -> dict:
        return {"status": "ok", "task": self.run.task_name, "experts": self.names}

    async def predict(self, request: Request) -> dict:
        started = time.perf_counter()
        target = self._target_of(request)
        body = await self._read_body(request)
        served = await self._off(self._decode, body)
        count = len(served.gate_input)
        if count > self.settings.max_units:
            raise HTTPError(413, f"the input makes {count} routing units, over the limit of "
                                 f"{self.settings.max_units} per request")
        assignment = np.empty(count, dtype=np.int64)
        outputs: list = [None] * count
        sent = 0
        chosen_any: set[int] = set()
        step = self.settings.chunk_units
        for start in range(0, count, step):  # one chunk in memory at a time
            units = np.arange(start, min(start + step, count))
            routed, frames = await self._off(self._route_chunk, served, units, target)
            assignment[units] = routed
            chosen = sorted(frames)
            replies = await asyncio.gather(*(self._call_expert(n, frames[n]) for n in chosen))
            for n, reply in zip(chosen, replies):
                for unit, out in zip(units[routed == n], wire.decode(reply)):
                    outputs[unit] = out
            sent += sum(len(f) for f in frames.values())
            chosen_any.update(chosen)
        prediction = await self._off(self.task.response, served, outputs)

        data_cost = float(self.d[assignment].sum())
        with self.lock:
            self.requests += 1
            np.add.at(self.units, assignment, 1)
            self.expert_requests[sorted(chosen_any)] += 1
            self.bytes.update({"data_cost": data_cost, "full_data_cost": served.full_data_cost, "wire_sent": sent,
                               "full_wire": served.full_wire_bytes})
        counts = np.bincount(assignment, minlength=len(self.d))
        return {
            "task": self.run.task_name,
            "prediction": prediction,
            "expert": self.names[int(np.argmax(counts))],  # the one most units went to
            "experts": [self.names[n] for n in assignment],  # per routing unit
            "data_cost_bytes": data_cost,
            "wire_bytes": sent,
            "full_data_cost_bytes": served.full_data_cost,
            "target_cost": target,
            "latency_ms": (time.perf_counter() - started) * 1000.0,
        }

    def snapshot(self) -> dict:
        """This replica's counters and budget streams (what /stats sums over replicas)."""
        with self.lock:
            return {
                "replica": serve.get_replica_context().replica_id.unique_id,
                "uptime_s": time.time() - self.started,
                "requests": self.requests,
                "errors": {str(k): v for k, v in self.errors.items()},
                "retried_expert_calls": self.retried,
                "units": self.units.tolist(),
                "expert_requests": self.expert_requests.tolist(),
                "in_flight": self.in_flight.tolist(),
                "bytes": {k: float(v) for k, v in self.bytes.items()},
                "budget": self.controllers[self.target].summary(),
                "overrides": {f"{t:g}": c.summary() for t, c in self.controllers.items() if t != self.target},
            }

    async def stats(self) -> dict:
        """The whole application: every router replica's counters summed, and each replica's."""
        context = serve.get_replica_context()
        me = context.replica_id.deployment_id
        try:
            handle = serve.get_deployment_handle(me.name, me.app_name)
            snapshots = await handle.broadcast("snapshot").results_async()
        except Exception:  # noqa: BLE001 - stats still answer, from this replica alone
            snapshots = [self.snapshot()]
        return aggregate_stats(snapshots, self.run, self.d, self.names) | {
            "gate": {"file": self.run.gate_file, "method": self.run.gate_method},
            "replicas": await self._off(_running_replicas),  # a controller call: off the loop
        }

    # -- work off the event loop ----------------------------------------------------------------
    async def _off(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.pool, fn, *args)

    def _decode(self, body: bytes):
        from tasks.base import BadInput, InputTooSmall

        try:
            return self.task.decode_request(body)
        except InputTooSmall as err:
            raise HTTPError(422, str(err)) from None
        except BadInput as err:
            raise HTTPError(400, str(err)) from None

    def _route_chunk(self, served, units: np.ndarray, target: float) -> tuple[np.ndarray, dict[int, bytes]]:
        """Gate, budget controller and P_n of one chunk of units: (expert per unit, frame per expert)."""
        values = gate_values(self.gate, self.gate_bundle, self.task.gate_tensor(served.gate_input[units]))  # (C, N)
        with self.lock:  # the stream's order is the order chunks are routed in
            routed = self._controller(target).route(values)
        frames = {int(n): wire.encode([self.task.request_inputs(served, int(n), units[routed == n])])
                  for n in np.unique(routed)}  # only P_n of the units routed to n crosses
        return routed, frames

    # -- helpers ----------------------------------------------------------------------------
    def _target_of(self, request: Request) -> float:
        raw = request.headers.get(TARGET_HEADER) or request.query_params.get(TARGET_QUERY)
        if raw is None:
            return self.target
        shown = raw if len(raw) <= 100 else raw[:100] + f"... ({len(raw)} characters)"  # never echoed back whole
        try:
            target = float(raw)
        except ValueError:
            raise HTTPError(400, f"target cost {shown!r} is not a number of bytes") from None
        lo, hi = float(self.d.min()), float(self.d.max())
        if not (np.isfinite(target) and lo <= target <= hi):
            raise HTTPError(400, f"target cost {shown} is outside the feasible range [{lo:g}, {hi:g}] bytes")
        return target

    def _controller(self, target: float) -> BudgetController:
        if target not in self.controllers:
            if len(self.controllers) > MAX_OVERRIDE_STREAMS:  # forget the oldest override stream
                oldest = next(t for t in self.controllers if t != self.target)
                del self.controllers[oldest]
            self.controllers[target] = self._calibrate(target)
        return self.controllers[target]

    async def _read_body(self, request: Request) -> bytes:
        limit = self.settings.max_body_bytes
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise HTTPError(413, f"request body of {int(length)} bytes is over the {limit}-byte limit")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise HTTPError(413, f"request body is over the {limit}-byte limit")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not body:
            raise HTTPError(400, "empty request body: POST the raw bytes of the input file")
        return body

    async def _call_expert(self, n: int, frame: bytes) -> bytes:
        """Expert n on one frame; a replica that dies mid-call (crash, ray.kill, node loss) costs
        a retry on another or a restarted replica, not the request."""
        self.in_flight[n] += 1  # the event loop's thread alone touches in_flight
        try:
            for attempt in range(self.settings.retries + 1):
                try:
                    return await self.experts[n].remote(frame)
                except _RETRYABLE:
                    if attempt == self.settings.retries:
                        raise HTTPError(503, f"expert {self.names[n]} is unavailable after "
                                             f"{self.settings.retries} retries") from None
                    with self.lock:
                        self.retried += 1
                    await asyncio.sleep(self.settings.retry_backoff_s * 2**attempt)
        finally:
            self.in_flight[n] -= 1

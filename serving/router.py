"""The ingress deployment: the sensor side of the mixture (the paper's Fig. 2).

For each request it decodes the body into routing units, runs the gate on the full input,
routes every unit with the streaming budget controller, makes P_n of each unit on the sensor
and sends only that, in the wire format, to the chosen expert's deployment, then assembles the
task's JSON prediction. It counts bytes: the data cost spent (K bytes per value, the paper's
convention), the wire bytes actually sent, and what sending every full input would have cost.

Routes (under the app's route prefix): POST /<task>/predict, GET /<task>/stats,
GET /<task>/healthz (the Serve proxy answers GET /-/healthz itself).
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter

import numpy as np
from ray import serve
from ray.exceptions import RayActorError
from ray.serve.exceptions import DeploymentUnavailableError, ReplicaUnavailableError
from starlette.requests import Request
from starlette.responses import JSONResponse

from serving import wire
from serving.budget import BudgetController
from serving.loading import ServedModels, gate_values
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


@serve.deployment
class Router:
    """Gate, budget controller, P_n and byte accounting; experts[n] is expert n's handle."""

    def __init__(self, models: ServedModels, settings: ServeSettings, target: float, experts: list):
        import torch

        from bmoe.gating import build_gate

        torch.set_num_threads(1)
        self.models = models
        self.settings = settings
        self.task = models.task_obj()
        self.names = models.expert_names
        self.d = models.d
        self.experts = experts
        self.gate = build_gate(self.task.gate_spec(), models.gate["width"])
        self.gate.load_state_dict(models.gate["state_dict"])
        self.gate.eval()
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
        return BudgetController.calibrated(self.d, target, self.models.val_values, window=self.settings.window)

    # -- HTTP -------------------------------------------------------------------------------
    async def __call__(self, request: Request) -> JSONResponse:
        path = request.url.path
        prefix = request.scope.get("root_path", "")
        if prefix and path.startswith(prefix):
            path = path[len(prefix):]
        path = "/" + path.strip("/")
        base = f"/{self.models.task}"
        if not path.startswith(base + "/") and path != "/-/healthz":  # app mounted at /<task>
            path = base + ("" if path == "/" else path)
        try:
            if path == f"{base}/predict":
                if request.method != "POST":
                    raise HTTPError(405, f"{path} takes POST with the raw bytes of an input file")
                return JSONResponse(await self.predict(request))
            if path == f"{base}/stats" and request.method == "GET":
                return JSONResponse(self.stats())
            if path in (f"{base}/healthz", "/-/healthz") and request.method == "GET":
                return JSONResponse({"status": "ok", "task": self.models.task, "experts": self.names})
            raise HTTPError(404, f"no route {request.method} {path}; try POST {base}/predict, GET {base}/stats")
        except HTTPError as err:
            self.errors[err.status] += 1
            return JSONResponse({"error": str(err), "status": err.status}, status_code=err.status)

    async def predict(self, request: Request) -> dict:
        from tasks.base import BadInput, InputTooSmall

        started = time.perf_counter()
        target = self._target_of(request)
        body = await self._read_body(request)
        try:
            served = self.task.decode_request(body)
        except InputTooSmall as err:
            raise HTTPError(422, str(err)) from None
        except BadInput as err:
            raise HTTPError(400, str(err)) from None
        values = gate_values(self.gate, self.models.gate, self.task.gate_tensor(served.gate))  # (U, N)
        assignment = self._controller(target).route(values)  # (U,)
        chosen = [int(n) for n in np.unique(assignment)]
        frames = {n: wire.encode([self.task.request_inputs(served, n, np.flatnonzero(assignment == n))])
                  for n in chosen}  # only P_n of the units routed to n crosses
        replies = await asyncio.gather(*(self._call_expert(n, frames[n]) for n in chosen))
        outputs: list = [None] * len(assignment)
        for n, reply in zip(chosen, replies):
            for unit, out in zip(np.flatnonzero(assignment == n), wire.decode(reply)):
                outputs[unit] = out
        prediction = self.task.response(served, outputs, assignment)

        data_cost = float(self.d[assignment].sum())
        sent = sum(len(f) for f in frames.values())
        self.requests += 1
        np.add.at(self.units, assignment, 1)
        self.expert_requests[chosen] += 1
        self.bytes.update({"data_cost": data_cost, "full_data_cost": served.full_data_cost, "wire_sent": sent,
                           "full_wire": served.full_wire_bytes})
        counts = np.bincount(assignment, minlength=len(self.d))
        return {
            "task": self.models.task,
            "prediction": prediction,
            "expert": self.names[int(np.argmax(counts))],  # the one most units went to
            "experts": [self.names[n] for n in assignment],  # per routing unit
            "data_cost_bytes": data_cost,
            "wire_bytes": sent,
            "full_data_cost_bytes": served.full_data_cost,
            "target_cost": target,
            "latency_ms": (time.perf_counter() - started) * 1000.0,
        }

    def stats(self) -> dict:
        total = int(self.units.sum())
        default = self.controllers[self.target]
        return {
            "task": self.models.task,
            "uptime_s": time.time() - self.started,
            "requests": self.requests,
            "units": total,
            "errors": {str(k): v for k, v in sorted(self.errors.items())},
            "retried_expert_calls": self.retried,
            "experts": {name: {"data_cost_bytes": float(self.d[n]), "units": int(self.units[n]),
                               "utilisation": self.units[n] / total if total else 0.0,
                               "requests": int(self.expert_requests[n]), "in_flight": int(self.in_flight[n])}
                        for n, name in enumerate(self.names)},
            "budget": default.summary(),
            "overrides": {f"{t:g}": c.summary() for t, c in self.controllers.items() if t != self.target},
            "bytes": {**{k: float(v) for k, v in self.bytes.items()},
                      "data_cost_vs_full": _ratio(self.bytes["data_cost"], self.bytes["full_data_cost"]),
                      "wire_vs_full": _ratio(self.bytes["wire_sent"], self.bytes["full_wire"])},
            "gate": {"file": self.models.gate_file, "method": self.models.gate["method"]},
            "replicas": _running_replicas(),
        }

    # -- helpers ----------------------------------------------------------------------------
    def _target_of(self, request: Request) -> float:
        raw = request.headers.get(TARGET_HEADER) or request.query_params.get(TARGET_QUERY)
        if raw is None:
            return self.target
        try:
            target = float(raw)
        except ValueError:
            raise HTTPError(400, f"target cost {raw!r} is not a number of bytes") from None
        lo, hi = float(self.d.min()), float(self.d.max())
        if not (np.isfinite(target) and lo <= target <= hi):
            raise HTTPError(400, f"target cost {raw} is outside the feasible range [{lo:g}, {hi:g}] bytes")
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
        self.in_flight[n] += 1
        try:
            for attempt in range(self.settings.retries + 1):
                try:
                    return await self.experts[n].remote(frame)
                except _RETRYABLE:
                    if attempt == self.settings.retries:
                        raise HTTPError(503, f"expert {self.names[n]} is unavailable after "
                                             f"{self.settings.retries} retries") from None
                    self.retried += 1
                    await asyncio.sleep(self.settings.retry_backoff_s * 2**attempt)
        finally:
            self.in_flight[n] -= 1


def _ratio(a: float, b: float) -> float | None:
    return a / b if b else None


def _running_replicas() -> dict[str, int]:
    """RUNNING replicas per deployment of this app, from Serve's controller (autoscaling at work)."""
    try:
        app = serve.status().applications[serve.get_replica_context().app_name]
        return {name: int(d.replica_states.get("RUNNING", 0)) for name, d in app.deployments.items()}
    except Exception as err:  # noqa: BLE001 - stats must answer even if the controller is busy
        return {"unavailable": str(err)}

"""Build the Serve application of one task: an autoscaled Router ingress and one autoscaled
deployment per expert, composed through DeploymentHandles (the Router receives the experts'
handles when bound).

    serve run serving.app:build_app task=superres root=./bmoe-runs target_cost=4096
    bmoe serve --task superres --root ./bmoe-runs --target-cost 4096
    bmoe serve --task superres --expert-gpus 0.25 --router-gpus 0.1   # Ray places replicas on GPUs
    serve deploy serving/serve_config.yaml     # the same app from a config file, on a cluster

Nothing is bound at import time: build_app(args) / build(settings) make the application. What
is bound is a ServedRun (references to the run's files or registered models, a few hundred
bytes); each replica loads its own weights, on the GPU Ray assigned it if any, else the CPU
(serving.loading.replica_device).
"""

from __future__ import annotations

import numpy as np
from ray.serve import Application

from serving.experts import Expert
from serving.loading import ServedRun, resolve_run
from serving.router import Router
from serving.settings import ServeSettings


def budget_target(settings: ServeSettings, d: np.ndarray) -> float:
    """The default d_t: --target-cost, else b . d for --bias, else d_max / 2."""
    d = np.asarray(d, dtype=np.float64)
    if settings.target_cost is not None and settings.bias is not None:
        raise ValueError("give a target cost or a bias, not both")
    if settings.bias is not None:
        b = np.asarray(settings.bias, dtype=np.float64)
        if b.shape != d.shape or (b < 0).any() or not np.isclose(b.sum(), 1.0):
            raise ValueError(f"bias must be {len(d)} non-negative shares summing to 1, got {settings.bias}")
        return float(b @ d)
    target = float(settings.target_cost) if settings.target_cost is not None else float(d.max()) / 2
    if not (d.min() <= target <= d.max()):
        raise ValueError(f"target cost {target:g} bytes is outside the feasible range [{d.min():g}, {d.max():g}]")
    return target


def default_gate_target(settings: ServeSettings) -> float | None:
    """The target the default gate is chosen for: --target-cost, else b . d of --bias (d from the
    root's manifest), else None (d_max / 2)."""
    if settings.target_cost is not None or settings.bias is None:
        return settings.target_cost
    from pipelines.layout import RunLayout
    from pipelines.manifest import read_manifest

    manifest = read_manifest(RunLayout.of(settings.root, settings.task))
    if manifest is None or len(manifest["data_costs"]) != len(settings.bias):
        return None  # resolve_run or budget_target names what is wrong
    return float(np.asarray(settings.bias, dtype=np.float64) @ np.asarray(manifest["data_costs"], dtype=np.float64))


def resolve(settings: ServeSettings) -> ServedRun:
    return resolve_run(settings.root, settings.task, settings.gate_file, default_gate_target(settings),
                       settings.expert_uris, settings.tracking_uri)


def build(settings: ServeSettings, run: ServedRun | None = None) -> Application:
    """The bound application (Router over one Expert deployment per expert)."""
    run = run or resolve(settings)
    target = budget_target(settings, run.costs)
    experts = []
    for n, name in enumerate(run.expert_names):
        scaling = settings.scaling(n)
        deployment = Expert.options(**scaling.deployment_options(f"{run.task_name}-expert-{n}-{name}"))
        experts.append(deployment.bind(run, n, scaling.max_batch_size, scaling.batch_wait_timeout_s))
    router = Router.options(**settings.router.deployment_options(f"{run.task_name}-router"))
    return router.bind(run, settings, target, experts)


def build_app(args: dict) -> Application:
    """Serve's application builder (`serve run serving.app:build_app key=value`, config `args:`)."""
    return build(ServeSettings.from_args(args))


def run(settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000, blocking: bool = False,
        served: ServedRun | None = None, access_log: bool = True):
    """Start Serve's HTTP proxy on host:port (loopback by default) and deploy the task's app at
    /<task>, so several tasks' apps can share one proxy. Returns the Router's handle.
    access_log=False keeps load tests and benchmarks from logging a line per request."""
    from ray import serve

    serve.start(http_options={"host": host, "port": port})
    app = build(settings, served)
    logging = None if access_log else {"enable_access_log": False, "log_level": "WARNING"}
    return serve.run(app, name=settings.task, route_prefix=f"/{settings.task}", blocking=blocking,
                     logging_config=logging)

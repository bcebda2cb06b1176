"""What a stage asks of the cluster, checked before it starts: nothing waits forever.

Ray queues a task or actor that no node can hold and waits for an autoscaler to add one. On a
fixed cluster (a workstation, a CI machine, a cluster without an autoscaler) that wait never
ends and nothing says why: two Ray Train workers holding both CPUs of a node left Ray Data's
read waiting for a CPU ("Active & requested resources: 1/0 CPU") with 0 rows after 4 minutes,
measured. A stage states its Demand; `require` asks an autoscaler for it (a hint, which a
cluster without one ignores), waits a bounded time for the cluster to grow, and otherwise stops
with one line that says what to change.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

from pipelines.runtime import UserError

WAIT_ENV = "BMOE_RESOURCE_WAIT_S"  # seconds to wait for an autoscaler; default below
CLUSTER_WAIT_S = 600.0  # on a cluster (RAY_ADDRESS set): long enough for a GPU node to boot
POLL_S = 5.0


@dataclass(frozen=True)
class Demand:
    """Resources a stage needs at once: `bundles` that must each fit on one node (a Train
    worker, a scorer actor, a trial) plus `free_cpus` left over for Ray Data's read tasks."""

    what: str  # e.g. "expert 0's fit: 2 Ray Train workers of 1 CPU"
    bundles: tuple[dict[str, float], ...]
    fix: str  # what to change, e.g. "pass --num-workers 1 or --cpus-per-worker 0.5"
    free_cpus: float = 0.0

    def total(self, resource: str) -> float:
        return sum(b.get(resource, 0.0) for b in self.bundles) + (self.free_cpus if resource == "CPU" else 0.0)


def shortfall(demand: Demand, total: dict[str, float], nodes: list[dict[str, float]]) -> str | None:
    """Why the cluster (its `total` resources and each alive node's) cannot hold the demand, or None."""
    for resource in ("CPU", "GPU"):
        need, have = demand.total(resource), total.get(resource, 0.0)
        if need > have + 1e-9:
            extra = " (one CPU beyond the workers is kept for Ray Data's reads)" if resource == "CPU" and \
                demand.free_cpus else ""
            return f"needs {need:g} {resource}{extra}, the cluster has {have:g}"
    for bundle in demand.bundles:
        if not any(all(node.get(k, 0.0) + 1e-9 >= v for k, v in bundle.items()) for node in nodes):
            shape = ", ".join(f"{v:g} {k}" for k, v in bundle.items())
            return f"needs {shape} on one node, and no node has that much"
    return None


def _cluster() -> tuple[dict[str, float], list[dict[str, float]]]:
    import ray

    nodes = [node.get("Resources", {}) for node in ray.nodes() if node.get("Alive")]
    return ray.cluster_resources(), nodes


def wait_seconds() -> float:
    """How long to wait for an autoscaler: BMOE_RESOURCE_WAIT_S, else none on a local Ray (no node
    will join it) and CLUSTER_WAIT_S on a cluster joined through RAY_ADDRESS."""
    value = os.environ.get(WAIT_ENV)
    if value:
        try:
            return max(0.0, float(value))
        except ValueError:
            raise UserError(f"{WAIT_ENV}={value!r}: expected seconds") from None
    return CLUSTER_WAIT_S if os.environ.get("RAY_ADDRESS") else 0.0


def require(demand: Demand, wait_s: float | None = None) -> None:
    """Return once the cluster can hold `demand`; UserError (one line) if it cannot within wait_s."""
    wait_s = wait_seconds() if wait_s is None else wait_s
    why = shortfall(demand, *_cluster())
    if why is None:
        return
    deadline = time.monotonic() + wait_s
    if wait_s > 0:
        from ray.autoscaler.sdk import request_resources

        bundles = [{k: v for k, v in b.items() if v} for b in demand.bundles]
        if demand.free_cpus:
            bundles.append({"CPU": demand.free_cpus})
        request_resources(bundles=[b for b in bundles if b])  # a hint; ignored without an autoscaler
        print(f"{demand.what}: {why}; waiting up to {wait_s:.0f}s for the autoscaler ({WAIT_ENV})", flush=True)
        try:
            while why is not None and time.monotonic() < deadline:
                time.sleep(POLL_S)
                why = shortfall(demand, *_cluster())
        finally:
            request_resources(bundles=[])  # the stage's own workers keep the nodes they hold
    if why is not None:
        raise UserError(f"{demand.what} {why}: {demand.fix}")


def train_demand(expert: int, workers: int, use_gpu: bool, cpus_per_worker: float | None) -> Demand:
    """One expert's fit: its Ray Train workers (Ray's default: 1 CPU each, or 1 GPU and no CPU)
    plus one CPU for the Ray Data reads that feed them."""
    cpus = (0.0 if use_gpu else 1.0) if cpus_per_worker is None else cpus_per_worker
    worker = {"CPU": cpus, **({"GPU": 1.0} if use_gpu else {})}
    return Demand(what=f"train-experts: expert {expert}'s fit ({workers} Ray Train worker(s) of "
                       f"{', '.join(f'{v:g} {k}' for k, v in worker.items())})",
                  bundles=tuple(dict(worker) for _ in range(workers)), free_cpus=1.0,
                  fix="lower --num-workers or --cpus-per-worker, or add nodes")


def cache_demand(use_gpu: bool) -> Demand:
    """The cache's first scorer actor (Ray Data's default: 1 CPU, and a GPU with --gpu) plus one
    CPU for the reads that feed it."""
    actor = {"CPU": 1.0, **({"GPU": 1.0} if use_gpu else {})}
    return Demand(what="cache: a scorer actor (" + ", ".join(f"{v:g} {k}" for k, v in actor.items()) + ")",
                  bundles=(actor,), free_cpus=1.0, fix="run it on a cluster with that much free" +
                  (", or without --gpu" if use_gpu else ""))


def trial_demand(resources: dict[str, float]) -> Demand:
    """One sweep trial (tune.with_resources; trials read their splits with pyarrow, not Ray Data)."""
    bundle = {k.upper(): float(v) for k, v in resources.items() if v}
    return Demand(what="sweep: a trial (" + ", ".join(f"{v:g} {k}" for k, v in bundle.items()) + ")",
                  bundles=(bundle,), fix="lower --cpus-per-trial or --gpus-per-trial")

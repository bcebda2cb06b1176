"""One Serve deployment per frozen expert: it receives only P_n(x) in the wire format and
answers with its outputs in the same format. Requests from concurrent callers are batched with
@serve.batch, so a replica runs its network once per batch, in a worker thread: the replica's
event loop stays free for health checks and for queueing the next batch.

Each expert is bound as its own deployment (name, autoscaling_config, ray_actor_options from
serving.settings.Scaling), so the busiest expert scales on its own; each replica loads its own
weights from the run root or the registry (serving.loading.load_expert).
"""

from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from ray import serve

from serving import wire
from serving.loading import ServedRun, load_expert, replica_device


@serve.deployment
class Expert:
    """A frozen expert n of a task, on the GPU Ray assigned to the replica if any."""

    def __init__(self, run: ServedRun, n: int, max_batch_size: int = 16, batch_wait_timeout_s: float = 0.0,
                 threads: int = 1):
        torch.set_num_threads(threads)  # replicas share the node's cores
        self.task = run.task()
        self.n = n
        self.name = run.expert_names[n]
        self.device = replica_device()  # a GPU only when Ray gave the replica one (num_gpus > 0)
        self.model = load_expert(run, n).to(self.device)  # built once, from the root or the registry
        self.pool = ThreadPoolExecutor(1, thread_name_prefix=f"expert{n}")  # one batch at a time
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_timeout_s)

    def check_health(self) -> None:
        """Serve's periodic health check: answered at once, since batches run in the pool."""
        if self.pool._shutdown:  # noqa: SLF001
            raise RuntimeError(f"expert {self.name}'s worker thread is shut down")

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.0)
    async def infer(self, frames: list[bytes]) -> list[bytes]:
        return await asyncio.get_running_loop().run_in_executor(self.pool, self._run_batch, frames)

    def _run_batch(self, frames: list[bytes]) -> list[bytes]:
        """Each frame: one request's P_n units; one forward pass per batch of frames of the same shape."""
        arrays = [wire.decode(frame)[0] for frame in frames]  # each (U_i, ...)
        outputs: list = [None] * len(arrays)
        by_shape: dict[tuple, list[int]] = {}
        for i, arr in enumerate(arrays):
            by_shape.setdefault(arr.shape[1:], []).append(i)
        for members in by_shape.values():
            x = np.concatenate([arrays[i] for i in members])  # (sum U_i, ...)
            results = self.task.serve_expert(self.n, self.model, x, self.device)  # one array per unit
            start = 0
            for i in members:
                outputs[i] = wire.encode(results[start:start + len(arrays[i])])
                start += len(arrays[i])
        return outputs

    async def __call__(self, frame: bytes) -> bytes:
        return await self.infer(frame)

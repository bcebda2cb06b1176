"""One Serve deployment per frozen expert: it receives only P_n(x) in the wire format and
answers with its outputs in the same format. Requests from concurrent callers are batched with
@serve.batch, so a replica runs its network once per batch.

Each expert is bound as its own deployment (name, autoscaling_config, ray_actor_options from
serving.app.ExpertScaling), so the busiest expert scales on its own.
"""

from __future__ import annotations

import numpy as np
import torch
from ray import serve

from serving import wire


@serve.deployment
class Expert:
    """A frozen expert n of a task, on the GPU Ray assigned to the replica if any."""

    def __init__(self, task: str, profile: str, options: dict, n: int, state_dict: dict,
                 max_batch_size: int = 16, batch_wait_timeout_s: float = 0.005, threads: int = 1):
        from tasks import get_task

        torch.set_num_threads(threads)  # replicas share the node's cores
        self.task = get_task(task, profile, options)
        self.n = n
        self.name = self.task.expert_names()[n]
        # A GPU only when Ray gave the replica one (ray_actor_options num_gpus > 0).
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        model = self.task.build_expert(n)
        model.load_state_dict(state_dict)
        self.model = model.to(self.device).eval()
        self.infer.set_max_batch_size(max_batch_size)
        self.infer.set_batch_wait_timeout_s(batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def infer(self, frames: list[bytes]) -> list[bytes]:
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

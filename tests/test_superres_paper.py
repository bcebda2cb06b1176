"""The paper profile's super-resolution experts (ESPCN at x4, x3, x2, Table V) train sanely on real
images: a few optimizer steps of the profile's own recipe lower the loss of every expert."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipelines.train_experts import build_optimizer
from tasks import get_task


@pytest.mark.parametrize("n", [0, 1, 2])
def test_paper_expert_loss_goes_down_on_real_images(n, samples, one_thread):
    task = get_task("superres", "paper")
    rows = [r for path in sorted((samples / "set5" / "HR").glob("*.png"))[:2]
            for r in task.load({"source_id": path.stem, "path": str(path)})][:16]  # real Set5 patches
    batch = {"x": torch.as_tensor(np.stack([r[f"x{n}"] for r in rows])),
             "hr": torch.as_tensor(np.stack([r["hr"] for r in rows]))}
    torch.manual_seed(0)
    model = task.initial_expert(n)
    optimizer = build_optimizer(model, task.expert_training(n))
    losses = []
    for _ in range(40):  # small patches: cheap steps; the residual ESPCN starts near bicubic
        loss = task.train_loss(n, model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss))
    assert all(np.isfinite(losses)) and np.mean(losses[-5:]) < losses[0], losses

"""The action task's paper-profile experts (section IV-D): EMV-CNN-shaped streams [53] on the
motion grid upsampled to 224, every parameter of every expert trained (DDP refuses unused ones),
and the paper's recipe lowering the loss on the real UCF-101 clip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from pipelines.train_experts import build_optimizer
from tasks import get_task
from tasks.action.motion_vectors import GRID
from tasks.action.task import pack

# the paper's architecture and 224 upsample; fewer frames so a step takes seconds on a CPU
SMALL_PAPER = {"F_t": "4", "F_s": "1"}


def _random_batch(task, n: int, b: int = 2) -> dict[str, torch.Tensor]:
    s = task.settings
    rng = np.random.default_rng(0)
    grids = rng.normal(0, 2, size=(b, s.F_t, GRID, GRID, 2)).astype(np.float32)
    frames = rng.integers(0, 256, size=(b, s.F_s, s.H_s, s.W_s, 3), dtype=np.uint8)
    x = (grids, frames, np.stack([pack(g, f) for g, f in zip(grids, frames)]))[n]
    return {"x": torch.as_tensor(x), "label": torch.as_tensor(np.arange(b) % s.classes)}


@pytest.mark.parametrize("profile", ["smoke", "demo", "paper"])
def test_every_parameter_of_every_expert_gets_a_gradient(profile):
    """One forward and backward reach every parameter: DDP with more than one Ray Train worker
    fails from the second step on a parameter without a gradient (fusion's unused heads once)."""
    # the paper's modules at an eighth of their widths: which parameters forward uses is the same
    options = {**SMALL_PAPER, "H_s": "48", "W_s": "64", "expert_width": "0.125"} if profile == "paper" else {}
    task = get_task("action", profile, options)
    for n in range(len(task.expert_names())):
        torch.manual_seed(0)
        model = task.build_expert(n).train()
        task.train_loss(n, model, _random_batch(task, n)).backward()
        missing = [name for name, p in model.named_parameters() if p.grad is None]
        assert not missing, f"{profile} expert {n}: no gradient for {missing}"


def test_paper_experts_are_emv_cnn_streams():
    """[53]'s ClarifaiNet/ZFNet-like stream on 2 F_t channels at 224: 110 -> 55 -> 26 -> 13 -> 6
    maps, fc 4096 and fc 2048, whose output is the embedding Fig. 9 projects."""
    task = get_task("action", "paper", SMALL_PAPER)
    assert task.settings.upsample == 224 and task.settings.expert_arch == "emv"
    torch.manual_seed(0)
    model = task.build_expert(0).eval()
    convs = [(m.in_channels, m.out_channels, m.kernel_size[0], m.stride[0]) for m in model.modules()
             if isinstance(m, nn.Conv2d)]
    assert convs == [(8, 96, 7, 2), (96, 256, 5, 2), (256, 512, 3, 1), (512, 512, 3, 1), (512, 512, 3, 1)]
    linears = [(m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear)]
    assert linears == [(512 * 6 * 6, 4096), (4096, 2048), (2048, task.settings.classes)]
    sizes = []
    hooks = [m.register_forward_hook(lambda _, __, out: sizes.append(out.shape[-1]))
             for m in model.modules() if isinstance(m, (nn.Conv2d, nn.MaxPool2d))]
    x = _random_batch(task, 0, b=1)["x"]
    with torch.no_grad():
        assert model.embed(x).shape == (1, 2048)
        for hook in hooks:
            hook.remove()
        assert sizes == [110, 55, 26, 13, 13, 13, 13, 6]
        assert model.channels(x).shape == (1, 8, 224, 224)  # upsampled after transmission: d_0 is unchanged
        assert model(x).shape == (1, task.settings.classes)
    fusion = task.build_expert(2)
    assert [(m.in_features, m.out_features) for m in fusion.classifier.modules() if isinstance(m, nn.Linear)] == [
        (2 * 2048, task.settings.classes)]
    with pytest.raises(ValueError, match="expert_arch=emv needs upsample"):
        get_task("action", "paper", {"upsample": "24"})
    with pytest.raises(ValueError, match="expert_arch='vgg'"):
        get_task("action", "paper", {"expert_arch": "vgg"})


def _real_clip_pair(samples: Path, task) -> list[dict]:
    """The real UCF-101 clip through the task's own load, and its mirror image (dx negated) as a
    second clip with another label: a fixed two-clip batch."""
    root = samples / "ucf101"
    if not (root / "UCF-101").is_dir():
        pytest.skip("no UCF-101 sample clip")
    sources = task.list_sources(root, "train").sources + task.list_sources(root, "test").sources
    row = task.load(sources[0])[0]
    grid = row["x0"][:, :, ::-1].copy()  # (F_t, 24, 24, 2)
    grid[..., 0] *= -1
    frames = np.ascontiguousarray(row["x1"][:, :, ::-1])  # (F_s, H_s, W_s, 3)
    mirror = dict(zip(("x0", "x1", "x2"), task.expert_inputs(grid, frames)))
    return [row, {**mirror, "label": (row["label"] + 1) % task.settings.classes}]


@pytest.mark.slow
@pytest.mark.parametrize("n", [0, 1, 2], ids=["temporal", "spatial", "fusion"])
def test_paper_expert_loss_goes_down_on_the_real_clip(samples, n):
    """The paper's architecture and optimizer (its expert_training) learn a fixed batch of real
    clips: finite losses, the last below the first, over 4 steps."""
    task = get_task("action", "paper", SMALL_PAPER)
    rows = _real_clip_pair(samples, task)
    batch = {"x": torch.as_tensor(np.stack([r[f"x{n}"] for r in rows])),
             "label": torch.as_tensor([r["label"] for r in rows])}
    torch.manual_seed(0)
    model = task.build_expert(n).train()
    optimizer = build_optimizer(model, task.expert_training(n))
    losses = []
    for _ in range(4):
        loss = task.train_loss(n, model, batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(float(loss.detach()))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], losses

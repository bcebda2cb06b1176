"""Gate networks of Tables IV, VII and X, their exact multiply-add count, and the gate
training step on cached expert losses."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from bmoe.bias import bias_loss
from bmoe.routing import enforce_bias, sparse_gates, utility

__all__ = [
    "GateSpec",
    "DETECTION_GATE",
    "SUPERRES_GATE",
    "ACTION_GATE",
    "Gate",
    "build_gate",
    "count_macs",
    "GATE_METHODS",
    "enforced_gates",
    "gate_loss",
    "gate_step",
]


@dataclass(frozen=True)
class GateSpec:
    """One conv (plain or depthwise-separable) + ReLU + average pool + FC + ReLU + FC.

    Convolutions are 'valid' (no padding): that reproduces the tables' pool, flatten and FC
    shapes exactly. The tables' conv C column was evidently counted on a padded output
    (112x112, 32x32, 12x12), so our conv counts are a few percent lower; the FC layers,
    which dominate C_g, match to the multiply-add.
    """

    in_channels: int
    in_size: tuple[int, int]  # (H, W)
    n_experts: int = 3
    conv_channels: int = 64
    kernel: int = 3
    stride: int = 2
    separable: bool = True
    pool_kernel: int = 1  # 1: no pooling (Table X)
    pool_stride: int = 1
    hidden: int = 1024
    depth: int = 1  # conv stages: 1 is the tables' gate; see Gate for deeper ones

    def scaled(self, width: float) -> "GateSpec":
        """The same layout with conv channels and hidden units scaled by `width` (moves C_g)."""
        return dataclasses.replace(
            self,
            conv_channels=max(1, round(self.conv_channels * width)),
            hidden=max(1, round(self.hidden * width)),
        )

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.in_channels, *self.in_size)


# Table IV: 224x224 centre crop of the 300 px image; C_g < 1e8.
DETECTION_GATE = GateSpec(in_channels=3, in_size=(224, 224), pool_kernel=7, pool_stride=5, hidden=1024)
# Table VII: the 64x64 HR patch; C_g < 1e7. 31x31 conv output -> 3/3 pool -> 10x10x64 = 6400.
SUPERRES_GATE = GateSpec(in_channels=3, in_size=(64, 64), pool_kernel=3, pool_stride=3, hidden=512)
# Table X: 2*F_t motion-vector channels of 24x24 (the table's 320 channels: F_t = 160).
ACTION_GATE = GateSpec(in_channels=320, in_size=(24, 24), hidden=1024)


class Gate(nn.Module):
    """f(x; W_g): the gating model; returns (B, N) logits.

    depth 1 is the paper's tables' gate. depth > 1 stacks stride-2 stages (a plain conv, then
    depthwise-separable ones, conv_channels / 2**k channels up to conv_channels in the last),
    pooled over the whole input by max and mean, then FC + ReLU + FC: a gate that can tell a few
    small objects from none anywhere in the image, which one conv and a local pool cannot
    (bench/results/gate_levers.json's kind diagnostic on the detection demo).
    """

    def __init__(self, spec: GateSpec):
        super().__init__()
        self.spec = spec
        if spec.depth > 1:
            self._deep(spec)
            return
        c, k = spec.in_channels, spec.kernel
        if spec.separable:  # depthwise-separable conv [43]
            conv = nn.Sequential(
                nn.Conv2d(c, c, k, stride=spec.stride, groups=c, bias=False),
                nn.Conv2d(c, spec.conv_channels, 1),
            )
        else:
            conv = nn.Conv2d(c, spec.conv_channels, k, stride=spec.stride)
        h, w = ((s - k) // spec.stride + 1 for s in spec.in_size)
        h, w = ((s - spec.pool_kernel) // spec.pool_stride + 1 for s in (h, w))
        if h < 1 or w < 1:
            raise ValueError(f"gate input {spec.in_size} is too small for its conv and pool layers")
        self.features = nn.Sequential(
            conv,
            nn.ReLU(inplace=True),
            nn.AvgPool2d(spec.pool_kernel, spec.pool_stride) if spec.pool_kernel > 1 else nn.Identity(),
            nn.Flatten(),
        )
        self.head = nn.Sequential(
            nn.Linear(spec.conv_channels * h * w, spec.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(spec.hidden, spec.n_experts),
        )

    def _deep(self, spec: GateSpec) -> None:
        k, pad = spec.kernel, spec.kernel // 2
        widths = [max(1, spec.conv_channels // 2 ** (spec.depth - 1 - i)) for i in range(spec.depth)]
        layers: list[nn.Module] = [nn.Conv2d(spec.in_channels, widths[0], k, stride=spec.stride, padding=pad),
                                   nn.ReLU(inplace=True)]
        for c_in, c_out in zip(widths, widths[1:]):
            layers += [nn.Conv2d(c_in, c_in, k, stride=spec.stride, padding=pad, groups=c_in, bias=False),
                       nn.Conv2d(c_in, c_out, 1), nn.ReLU(inplace=True)]
        self.features = nn.Sequential(*layers, _GlobalMaxMean())
        self.head = nn.Sequential(
            nn.Linear(2 * widths[-1], spec.hidden),
            nn.ReLU(inplace=True),
            nn.Linear(spec.hidden, spec.n_experts),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, N)
        return self.head(self.features(x))


class _GlobalMaxMean(nn.Module):
    """(B, C, H, W) -> (B, 2C): each channel's max (is it anywhere?) and mean (how much of it?)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([x.amax(dim=(2, 3)), x.mean(dim=(2, 3))], dim=1)


def build_gate(spec: GateSpec, width: float = 1.0) -> Gate:
    return Gate(spec.scaled(width) if width != 1.0 else spec)


def count_macs(module: nn.Module, input_shape: tuple[int, int, int]) -> int:
    """Exact multiply-adds per input of the Conv2d and Linear layers of `module`.

    Runs one dummy input of shape (1, *input_shape) through the module and counts, per conv,
    output elements x (in_channels / groups) x kH x kW, and per linear layer in x out for
    every row it is applied to. Pooling, activations and biases are not counted (as in the
    paper's tables).
    """
    total = 0

    def on_conv(layer: nn.Conv2d, inputs, output):
        nonlocal total
        kh, kw = layer.kernel_size
        total += output[0].numel() * (layer.in_channels // layer.groups) * kh * kw

    def on_linear(layer: nn.Linear, inputs, output):
        nonlocal total
        rows = output[0].numel() // layer.out_features
        total += rows * layer.in_features * layer.out_features

    hooks = []
    for layer in module.modules():
        if isinstance(layer, nn.Conv2d):
            hooks.append(layer.register_forward_hook(on_conv))
        elif isinstance(layer, nn.Linear):
            hooks.append(layer.register_forward_hook(on_linear))
    param = next(module.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    was_training = module.training
    try:
        module.eval()
        with torch.no_grad():
            module(torch.zeros((1, *input_shape), device=device))
    finally:
        for hook in hooks:
            hook.remove()
        module.train(was_training)
    return int(total)


def enforced_gates(logits: torch.Tensor, b) -> torch.Tensor:
    """Softmax gates (eq. 1) over the experts with a non-zero quota only.

    An expert with b_n = 0 is never assigned under Algorithm 1; left in the softmax it lets the
    gate drive every assigned gate value (and so the loss) to zero by putting all mass on it,
    a degenerate optimum that stops learning (measured: train loss 0 after 5 epochs).
    """
    usable = torch.as_tensor(np.asarray(b, dtype=np.float64) > 0, device=logits.device)
    return torch.softmax(logits.masked_fill(~usable, float("-inf")), dim=1)


def _input_centred(losses: torch.Tensor, b) -> torch.Tensor:
    """Each input's losses less its mean over the experts b can use."""
    usable = torch.as_tensor(np.asarray(b, dtype=np.float64) > 0, device=losses.device)
    k = usable.sum().clamp_min(1)
    return losses - (losses * usable).sum(dim=1, keepdim=True) / k  # input means, (M, 1)


def soft_loss(logits: torch.Tensor, losses: torch.Tensor, b, w_bias: float = 0.0, baseline: bool = True):
    """Soft bias regularisation: G from the sparse gates (eq. 3), plus the bias loss (eq. 5) on
    the utility (eq. 4); with the baseline, c_i = input i's mean loss over the usable experts
    (as in REINFORCE), so G[i, n] grows where expert n does better than average on input i."""
    if baseline:
        losses = _input_centred(losses, b)
    G = sparse_gates(logits)  # (M, N)
    task = (G * losses).sum(dim=1).mean()
    return task + bias_loss(utility(G), b, w_bias), G.argmax(dim=1)


def enforce_loss(logits: torch.Tensor, losses: torch.Tensor, b, w_bias: float = 0.0, baseline: bool = True):
    """Batchwise bias enforcement: G is the soft gates (eq. 1) masked by Algorithm 1's
    assignment; task loss only (w_bias unused). With the baseline the losses are double-centred
    over the batch and the usable experts (input and expert means removed): with quotas fixed,
    both means add a constant to every feasible assignment's total, so the best assignment is
    unchanged; what remains is which inputs gain most from which expert, the ranking Algorithm 1
    needs. (A per-input baseline alone always favours the dearer expert and saturates.)"""
    if baseline:
        losses = _input_centred(losses, b)
        losses = losses - losses.mean(dim=0, keepdim=True)  # expert means over the batch, (1, N)
    probs = enforced_gates(logits, b)  # (M, N) eq. 1 over the experts b can use
    assignment = enforce_bias(probs, b).to(probs.device)  # Algorithm 1 (decided on the CPU)
    G = probs * nn.functional.one_hot(assignment, probs.shape[1]).to(probs.dtype)
    return (G * losses).sum(dim=1).mean(), assignment


OBJECTIVES = {"soft": soft_loss, "enforce": enforce_loss}  # the paper's two ways to train a biased gate
GATE_METHODS = tuple(OBJECTIVES)


def gate_loss(logits: torch.Tensor, losses: torch.Tensor, objective: str, b, w_bias: float = 0.0,
              baseline: bool = True):
    """The gate's training objective on a batch, L = mean_i sum_n G[i, n] * (loss[i, n] - c_i),
    with `objective` a key of OBJECTIVES (soft_loss, enforce_loss say what G and c are).

    With cached losses, G only scales each input's loss, so the plain objective (baseline=False,
    c = 0) is smallest when the gate values of the chosen experts shrink, whoever is chosen:
    measured on superres, the softmax saturates within a few epochs and the routing stops
    changing. The baseline removes that degenerate optimum.

    Args:
        logits: (M, N) gate outputs.
        losses: (M, N) frozen experts' per-sample task losses (the cache).
    Returns:
        (loss, assignment): scalar loss and the (M,) experts the batch was routed to.
    """
    try:
        loss = OBJECTIVES[objective]
    except KeyError:
        raise ValueError(f"unknown gate training method {objective!r}; expected one of {GATE_METHODS}") from None
    return loss(logits, losses, b, w_bias, baseline)


def gate_step(gate: nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor,
              losses: torch.Tensor, objective: str, b, w_bias: float = 0.0) -> dict:
    """One optimiser step of the gate on cached expert losses; the experts never run.

    Returns the batch's loss and the fraction of inputs routed to each expert.
    """
    gate.train()
    optimizer.zero_grad(set_to_none=True)
    loss, assignment = gate_loss(gate(x), losses, objective, b, w_bias)
    loss.backward()
    optimizer.step()
    n = losses.shape[1]
    share = np.bincount(assignment.cpu().numpy(), minlength=n) / max(len(assignment), 1)
    return {"loss": float(loss.detach()), "share": share}

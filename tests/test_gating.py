"""The gate networks of Tables IV, VII and X, their multiply-add counts, and the gate
training objective / step ('soft': eqs. 3-5, 'enforce': Algorithm 1)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from bmoe.bias import bias_loss
from bmoe.gating import (
    ACTION_GATE,
    DETECTION_GATE,
    GATE_METHODS,
    SUPERRES_GATE,
    GateSpec,
    build_gate,
    enforced_gates,
    count_macs,
    gate_loss,
    gate_step,
)
from bmoe.routing import enforce_bias, quotas

FAST = settings(max_examples=40, deadline=None)


def out_size(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


# --------------------------------------------------------------------------- count_macs


@FAST
@given(
    st.integers(1, 6),  # in channels
    st.integers(1, 6),  # out channels
    st.integers(1, 3),  # kernel
    st.integers(1, 3),  # stride
    st.integers(0, 1),  # padding
    st.integers(4, 12),  # H
    st.integers(4, 12),  # W
    st.booleans(),  # bias
)
def test_count_macs_of_one_conv(c_in, c_out, k, s, pad, H, W, bias):
    conv = nn.Conv2d(c_in, c_out, k, stride=s, padding=pad, bias=bias)
    expected = c_out * out_size(H, k, s, pad) * out_size(W, k, s, pad) * c_in * k * k
    assert count_macs(conv, (c_in, H, W)) == expected


@FAST
@given(st.integers(1, 8), st.integers(1, 3), st.integers(1, 3), st.integers(1, 2), st.integers(5, 14))
def test_count_macs_of_a_depthwise_conv(c, multiplier, k, s, size):
    conv = nn.Conv2d(c, c * multiplier, k, stride=s, groups=c, bias=False)
    # each output element reads one input channel's k x k window
    expected = c * multiplier * out_size(size, k, s) ** 2 * k * k
    assert count_macs(conv, (c, size, size)) == expected


def test_count_macs_of_a_grouped_conv_by_hand():
    conv = nn.Conv2d(8, 12, 3, groups=4)  # 2 input channels per group
    # out 12 x 6 x 6 = 432 elements, each 2 * 3 * 3 = 18 MACs -> 7776
    assert count_macs(conv, (8, 8, 8)) == 7776


@FAST
@given(st.integers(1, 300), st.integers(1, 300), st.booleans())
def test_count_macs_of_one_linear(n_in, n_out, bias):
    assert count_macs(nn.Linear(n_in, n_out, bias=bias), (n_in,)) == n_in * n_out


def test_count_macs_sums_the_layers_and_ignores_pooling_and_activations():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3, stride=2),  # 3x9x9 -> 4x4x4: 64 * 27 = 1728
        nn.ReLU(inplace=True),
        nn.AvgPool2d(2),  # 4x2x2
        nn.Flatten(),
        nn.Linear(16, 5),  # 80
        nn.ReLU(),
        nn.Linear(5, 2),  # 10
    )
    net.train()
    assert count_macs(net, (3, 9, 9)) == 1728 + 80 + 10
    assert net.training  # the mode is restored
    assert all(not layer._forward_hooks for layer in net.modules())  # hooks removed


def separable_conv_macs(spec: GateSpec) -> int:
    h, w = (out_size(s, spec.kernel, spec.stride) for s in spec.in_size)
    depthwise = spec.in_channels * h * w * spec.kernel**2
    pointwise = spec.conv_channels * h * w * spec.in_channels
    return depthwise + pointwise


@pytest.mark.parametrize(
    ("spec", "flat", "fc1", "fc2", "ceiling"),
    [
        (DETECTION_GATE, 28224, 28_901_376, 3_072, 1e8),  # Table IV: 21 x 21 x 64
        (SUPERRES_GATE, 6400, 3_276_800, 1_536, 1e7),  # Table VII: 10 x 10 x 64
        (ACTION_GATE, 7744, 7_929_856, 3_072, 1e8),  # Table X: 11 x 11 x 64
    ],
    ids=["table-IV", "table-VII", "table-X"],
)
def test_paper_gates_match_their_tables(spec, flat, fc1, fc2, ceiling):
    torch.manual_seed(0)
    gate = build_gate(spec)
    fcs = [layer for layer in gate.modules() if isinstance(layer, nn.Linear)]
    assert [(fc.in_features, fc.out_features) for fc in fcs] == [(flat, spec.hidden), (spec.hidden, 3)]
    # the FC multiply-adds of the table, exactly
    assert count_macs(gate.head, (flat,)) == fc1 + fc2
    # and the whole gate: the separable conv (counted on the 'valid' output) plus those FCs
    C_g = count_macs(gate, spec.input_shape)
    assert C_g == separable_conv_macs(spec) + fc1 + fc2
    assert C_g < ceiling
    with torch.no_grad():
        assert gate(torch.zeros(2, *spec.input_shape)).shape == (2, 3)


def test_detection_gate_conv_count_by_hand():
    # 224 -> (224 - 3) // 2 + 1 = 111; depthwise 111*111*3*9 = 332,667, pointwise
    # 111*111*64*3 = 2,365,632 (the table's 2,747,136 counted a padded 112 x 112 output)
    assert separable_conv_macs(DETECTION_GATE) == 332_667 + 2_365_632


def test_narrower_gates_cost_less():
    wide = count_macs(build_gate(SUPERRES_GATE), SUPERRES_GATE.input_shape)
    narrow_spec = SUPERRES_GATE.scaled(0.5)
    assert (narrow_spec.conv_channels, narrow_spec.hidden) == (32, 256)
    narrow = count_macs(build_gate(SUPERRES_GATE, width=0.5), SUPERRES_GATE.input_shape)
    # FC 1 halves twice (flatten 3200 x 256), the rest shrinks too
    assert narrow == separable_conv_macs(narrow_spec) + 3200 * 256 + 256 * 3
    assert narrow < wide / 3


def test_a_gate_input_too_small_is_refused():
    with pytest.raises(ValueError, match="too small"):
        build_gate(GateSpec(in_channels=3, in_size=(4, 4), pool_kernel=7, pool_stride=5))


# --------------------------------------------------------------------------- gate_loss


def test_gate_loss_soft_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(4.0)], [math.log(4.0), 0.0]])
    losses = torch.tensor([[1.0, 5.0], [2.0, 3.0], [4.0, 0.0]])
    # sparse gates: row 0 keeps 3/4 on expert 0, row 1 keeps 4/5 on expert 1, row 2 keeps 4/5 on 0
    task = (0.75 * 1.0 + 0.8 * 3.0 + 0.8 * 4.0) / 3
    # utility: rows 0 and 2 pick expert 0, row 1 expert 1 -> u = [2/3, 1/3]
    reg = float(bias_loss(torch.tensor([2 / 3, 1 / 3]), [0.5, 0.5], 0.7))
    loss, assignment = gate_loss(logits, losses, "soft", [0.5, 0.5], w_bias=0.7, baseline=False)
    assert float(loss) == pytest.approx(task + reg, rel=1e-6)
    assert assignment.tolist() == [0, 1, 0]
    # with the per-input baseline: row means [3, 2.5, 2] -> kept losses -2, 0.5, 2
    centred = (0.75 * -2.0 + 0.8 * 0.5 + 0.8 * 2.0) / 3
    loss, _ = gate_loss(logits, losses, "soft", [0.5, 0.5], w_bias=0.7)
    assert float(loss) == pytest.approx(centred + reg, rel=1e-6)


def test_gate_loss_enforce_by_hand():
    logits = torch.tensor([[math.log(3.0), 0.0], [0.0, math.log(4.0)], [math.log(4.0), 0.0], [0.0, 0.0]])
    losses = torch.tensor([[1.0, 5.0], [2.0, 3.0], [4.0, 0.0], [1.0, 1.0]])
    # softmax column 0 = [.75, .2, .8, .5]; b = [.25, .75] -> K = [1, 3]: expert 0 takes row 2
    loss, assignment = gate_loss(logits, losses, "enforce", [0.25, 0.75], baseline=False)
    assert assignment.tolist() == [1, 1, 0, 1]
    expected = (0.25 * 5.0 + 0.8 * 3.0 + 0.8 * 4.0 + 0.5 * 1.0) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    # double-centred: row means [3, 2.5, 2, 1], then column means [-0.125, 0.125] removed
    # -> kept losses 1.875 (row 0, expert 1), 0.375, 2.125 (row 2, expert 0), -0.125
    loss, _ = gate_loss(logits, losses, "enforce", [0.25, 0.75])
    expected = (0.25 * 1.875 + 0.8 * 0.375 + 0.8 * 2.125 + 0.5 * -0.125) / 4
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_enforced_gates_leave_out_experts_without_quota():
    logits = torch.tensor([[0.0, 0.0, 5.0], [1.0, 0.0, 9.0]])
    probs = enforced_gates(logits, [0.5, 0.5, 0.0])
    assert probs[:, 2].tolist() == [0.0, 0.0]
    assert probs.sum(dim=1).tolist() == pytest.approx([1.0, 1.0])
    assert probs[0, 0].item() == pytest.approx(0.5)


def test_gate_loss_rejects_an_unknown_method():
    assert GATE_METHODS == ("soft", "enforce")
    with pytest.raises(ValueError, match="unknown gate training method 'hard'"):
        gate_loss(torch.zeros(2, 2), torch.zeros(2, 2), "hard", [0.5, 0.5])


# --------------------------------------------------------------------------- gate_step


TINY = GateSpec(in_channels=1, in_size=(5, 5), n_experts=2, conv_channels=4, separable=False, hidden=16)


def two_kinds_of_input(M: int, seed: int):
    """Half the inputs are a bright image, half a dark one (plus noise): kind = x's sign."""
    g = torch.Generator().manual_seed(seed)
    kind = torch.arange(M) % 2
    sign = (1 - 2 * kind).to(torch.float32).view(M, 1, 1, 1)
    x = sign * torch.ones(M, *TINY.input_shape) + 0.2 * torch.randn(M, *TINY.input_shape, generator=g)
    return x, kind


def routing(gate, x, b):
    with torch.no_grad():
        return enforce_bias(torch.softmax(gate(x), dim=1), b)


def test_enforce_training_learns_which_inputs_suit_which_expert(one_thread):
    torch.manual_seed(0)
    gate = build_gate(TINY)
    b = [0.5, 0.5]
    x, kind = two_kinds_of_input(32, seed=1)
    # Make the task hard for the untrained gate: the expert that suits each kind of input is
    # the one the untrained gate does NOT mostly send it to (at most half routed right).
    before = routing(gate, x, b)
    best = kind if (before == kind).float().mean() <= 0.5 else 1 - kind
    losses = torch.ones(32, 2)
    losses[torch.arange(32), best] = 0.0  # expert `best` is perfect on its kind, the other useless
    assert (before == best).float().mean() <= 0.5

    optimizer = torch.optim.Adam(gate.parameters(), lr=0.01)
    history = []
    for _ in range(30):
        out = gate_step(gate, optimizer, x, losses, "enforce", b)
        np.testing.assert_array_equal(out["share"], quotas(32, b) / 32)  # Algorithm 1 every step
        history.append(out["loss"])

    after = routing(gate, x, b)
    assert (after == best).all()
    assert history[-1] < 0.1 * history[0]
    # and it generalises to fresh inputs of the same two kinds
    x_new, kind_new = two_kinds_of_input(32, seed=2)
    best_new = kind_new if torch.equal(best, kind) else 1 - kind_new
    assert (routing(gate, x_new, b) == best_new).float().mean() >= 0.9


def test_a_deeper_gate_counts_by_hand():
    spec = GateSpec(in_channels=3, in_size=(32, 32), n_experts=2, conv_channels=8, hidden=16, depth=3)
    # stages of 2, 4, 8 channels at stride 2 (padded): stem 16*16*2*3*9; separable 8*8*2*9 + 8*8*4*2,
    # 4*4*4*9 + 4*4*8*4; global max and mean: FC 16 x 16, 16 x 2
    assert count_macs(build_gate(spec), spec.input_shape) == 13_824 + 1_152 + 512 + 576 + 512 + 256 + 32


def small_square_or_none(M: int, seed: int):
    """Noise images, half of them with one bright 3x3 square somewhere: kind = has a square."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 * torch.randn(M, 3, 32, 32, generator=g)
    kind = torch.arange(M) % 2
    for i in torch.nonzero(kind).flatten():
        r, c = (int(v) for v in torch.randint(0, 29, (2,), generator=g))
        x[i, :, r:r + 3, c:c + 3] += 2.0
    return x, kind


def test_a_deeper_gate_learns_whether_a_small_object_is_anywhere(one_thread):
    """What the detection demo needs of its gate: a few small objects anywhere in the image mean
    the dear expert; one conv and a local pool told such scenes from the rest about half the time."""
    torch.manual_seed(0)
    gate = build_gate(GateSpec(in_channels=3, in_size=(32, 32), n_experts=2, conv_channels=16, hidden=32, depth=3))
    x, kind = small_square_or_none(128, seed=1)
    losses = torch.ones(128, 2)
    losses[torch.arange(128), kind] = 0.0  # expert 1 for the squares, expert 0 for the rest
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.01)
    for _ in range(80):
        gate_step(gate, optimizer, x, losses, "enforce", [0.5, 0.5])
    x_new, kind_new = small_square_or_none(128, seed=2)  # squares at fresh places
    assert (routing(gate, x_new, [0.5, 0.5]) == kind_new).float().mean() >= 0.9


def test_soft_training_moves_the_utility_towards_the_bias(one_thread):
    torch.manual_seed(0)
    gate = build_gate(TINY)
    x, _ = two_kinds_of_input(32, seed=3)
    losses = torch.zeros(32, 2)  # no task preference: only the bias loss can move the gate
    with torch.no_grad():
        nn.init.zeros_(gate.head[2].weight)
        gate.head[2].bias.copy_(torch.tensor([3.0, 0.0]))  # everything to expert 0 at first
    b = [0.5, 0.5]
    optimizer = torch.optim.Adam(gate.parameters(), lr=0.05)
    first = gate_step(gate, optimizer, x, losses, "soft", b, w_bias=1.0)
    assert first["share"].tolist() == [1.0, 0.0]
    for _ in range(60):
        last = gate_step(gate, optimizer, x, losses, "soft", b, w_bias=1.0)
    assert abs(last["share"][0] - 0.5) <= 0.25
    assert last["loss"] < first["loss"]

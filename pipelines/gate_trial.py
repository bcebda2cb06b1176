"""One sweep trial: a selection method evaluated at one or more data-cost targets, from the
expert cache only (no expert ever runs here).

Methods:
  experts    the LP mix of single experts (the paper's dotted line): b.p at b.d = d_t
  random     random selection with exact quotas K_n = M b_n (the paper's lower bound)
  heuristic  a hand-made difficulty per input (the task's), quotas as random
  oracle     every expert's per-input score known: the upper bound no gate can beat
  soft       gate trained with soft bias regularisation (eqs. 3-5), argmax at test time
  enforce    gate trained with batchwise bias enforcement (Algorithm 1), enforced at test time
  lagrange   gate regressing every expert's score; routes by score - lambda d (our extension)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from bmoe.bias import select_bias
from bmoe.gating import Gate, build_gate, count_macs, enforced_gates, gate_step
from bmoe.lagrange import calibrate_lambda, lagrange_assignment, score_loss
from bmoe.routing import enforce_bias, oracle_assignment, quotas, random_assignment
from storage import AnyPath, load_torch, save_torch
from tasks import get_task

STATIC_METHODS = ("experts", "random", "heuristic", "oracle")  # no training: all targets in one trial
TRAINED_METHODS = ("soft", "enforce")  # one trial per target and hyperparameters
METHODS = (*STATIC_METHODS, *TRAINED_METHODS, "lagrange")


@dataclass
class SplitData:
    """What a trial needs of one split: gate inputs and the cached per-expert columns."""

    gate: np.ndarray  # (M, ...) stored gate inputs, as prepared
    cache: pd.DataFrame  # one row per sample, same order as gate
    losses: np.ndarray  # (M, N) per-sample expert losses
    scores: np.ndarray  # (M, N) per-sample additive scores


def run_trial(config: dict, data: dict[str, SplitData]) -> dict:
    """Evaluate one configuration; reports per-epoch metrics through `report` and returns the
    final record: {"points": [{d_target, d_mean, performance, ...}], ...}."""
    from ray import tune

    torch.set_num_threads(1)  # trials share the cores: one thread each
    task = get_task(config["task"], config["profile"], config.get("options"))
    method = config["method"]
    d = task.data_costs()
    p_val = expert_performance(task, data["val"])
    seed = int(config.get("seed", 0))
    report = tune.report

    if method in STATIC_METHODS:
        points = [_static_point(task, method, data["test"], d, p_val, d_t, seed) for d_t in config["targets"]]
        result = {"points": points}
    elif method in TRAINED_METHODS:
        result = _train_biased_gate(task, config, data, d, p_val, report)
    elif method == "lagrange":
        result = _train_lagrange_gate(task, config, data, d, report)
    else:
        raise ValueError(f"unknown method {method!r}; expected one of {', '.join(METHODS)}")
    return result


def expert_performance(task, split: SplitData) -> np.ndarray:
    """(N,) each single expert's task metric over the whole split."""
    n_experts = split.losses.shape[1]
    M = len(split.cache)
    return np.array([task.metric(split.cache, np.full(M, n))["performance"] for n in range(n_experts)])


def _static_point(task, method: str, test: SplitData, d, p_val, d_t: float, seed: int) -> dict:
    b = select_bias(d, p_val, d_t)
    M = len(test.cache)
    if method == "experts":
        p_test = expert_performance(task, test)
        return {"d_target": d_t, "d_mean": float(b @ d), "performance": float(b @ p_test), "b": b.tolist()}
    if method == "random":
        gen = torch.Generator().manual_seed(seed)
        assignment = random_assignment(M, b, gen).numpy()
    elif method == "oracle":
        assignment = oracle_assignment(test.scores * sample_weights(task, test)[:, None], d, d_t).numpy()
    else:  # heuristic
        difficulty = task.heuristic(test.gate)
        if difficulty is None:
            raise ValueError(f"task {task.name} has no heuristic router")
        assignment = quantile_assignment(difficulty, b, d)
    return _point(task, test, assignment, d, d_t, b)


def quantile_assignment(difficulty: np.ndarray, b, d) -> np.ndarray:
    """Exact quotas K_n; the easiest inputs go to the cheapest expert, the hardest to the dearest."""
    K = quotas(len(difficulty), b)
    by_cost = np.argsort(d, kind="stable")
    order = np.argsort(difficulty, kind="stable")  # easiest first
    assignment = np.empty(len(difficulty), dtype=np.int64)
    start = 0
    for n in by_cost:
        assignment[order[start:start + K[n]]] = n
        start += K[n]
    return assignment


def _point(task, split: SplitData, assignment: np.ndarray, d, d_t: float, b=None) -> dict:
    """Mixture metric and data cost actually spent, plus each expert on its assigned inputs."""
    metrics = task.metric(split.cache, assignment)
    n_experts = len(d)
    share = np.bincount(assignment, minlength=n_experts) / max(len(assignment), 1)
    assigned = []
    for n in range(n_experts):
        mask = assignment == n
        assigned.append(float(task.metric(split.cache[mask], np.full(int(mask.sum()), n))["performance"])
                        if mask.any() else None)
    return {
        "d_target": float(d_t),
        "d_mean": float(np.asarray(d)[assignment].mean()),
        **{k: float(v) for k, v in metrics.items()},
        "share": share.tolist(),
        "assigned_performance": assigned,
        **({"b": np.asarray(b).tolist()} if b is not None else {}),
    }


def sample_weights(task, split: SplitData) -> np.ndarray:
    """(M,) the task's first-order weight of each sample in its metric (ones if it has none):
    it makes the oracle's additive scores track a metric that pools before a nonlinearity.
    (Weighting the gate's training losses the same way was measured worse on superres:
    -0.3 to -1.1 dB at d_max/2 and 0.6 d_max, so the gate trains on the cached losses.)"""
    fn = getattr(task, "sample_weights", None)
    return fn(split.cache) if fn is not None else np.ones(len(split.cache))


def augment(task, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The task's label-preserving augmentation of a batch of gate inputs, if it has one."""
    fn = getattr(task, "augment_gate", None)
    return fn(x, gen) if fn is not None else x


def _batches(M: int, batch: int, gen: torch.Generator):
    order = torch.randperm(M, generator=gen)
    for start in range(0, M - batch + 1, batch):  # full batches only: quotas need M * b_n inputs
        yield order[start:start + batch]


def _train_biased_gate(task, config: dict, data: dict[str, SplitData], d, p_val, report) -> dict:
    method, d_t = config["method"], float(config["d_target"])
    b = select_bias(d, p_val, d_t)  # eqs. 6-8 on validation performance
    gen = torch.Generator().manual_seed(int(config.get("seed", 0)))
    torch.manual_seed(int(config.get("seed", 0)))
    gate = build_gate(task.gate_spec(), config["width"])
    c_g = count_macs(gate, task.gate_spec().scaled(config["width"]).input_shape)
    optimizer = torch.optim.Adam(gate.parameters(), lr=config["lr"])
    train = data["train"]
    x_train = task.gate_tensor(train.gate)
    # Scaling the losses by one constant leaves the optimum unchanged and keeps lr meaningful.
    losses = torch.as_tensor(train.losses / max(train.losses.mean(), 1e-12), dtype=torch.float32)
    batch = min(int(config["batch_size"]), len(losses))

    def route(split: SplitData) -> np.ndarray:
        gate.eval()
        with torch.no_grad():
            logits = gate(task.gate_tensor(split.gate))
        if method == "enforce":  # test batches are routed with the same quotas
            return enforce_bias(enforced_gates(logits, b), b).numpy()
        return logits.argmax(dim=1).numpy()

    best, best_state = -np.inf, None
    for epoch in range(1, int(config["epochs"]) + 1):
        total, steps = 0.0, 0
        for idx in _batches(len(losses), batch, gen):
            stats = gate_step(gate, optimizer, augment(task, x_train[idx], gen), losses[idx], method, b,
                              config.get("w_bias", 0.0))
            total, steps = total + stats["loss"], steps + 1
        val = _point(task, data["val"], route(data["val"]), d, d_t, b)
        report({"epoch": epoch, "train_loss": total / max(steps, 1), "val_performance": val["performance"],
                "val_d_mean": val["d_mean"], **{f"val_u_{n}": u for n, u in enumerate(val["share"])}})
        # model selection on validation: the best epoch within the budget's tolerance
        if val["performance"] > best:
            best, best_state = val["performance"], {k: v.clone() for k, v in gate.state_dict().items()}
    if best_state is not None:
        gate.load_state_dict(best_state)
    test_assignment = route(data["test"])
    point = _point(task, data["test"], test_assignment, d, d_t, b)
    return {"points": [point], "val_performance": best, "C_g": c_g, "test_assignment": test_assignment,
            "gate": gate_bundle(gate, config, d_target=d_t, bias=b.tolist())}


def _train_lagrange_gate(task, config: dict, data: dict[str, SplitData], d, report) -> dict:
    torch.manual_seed(int(config.get("seed", 0)))
    gen = torch.Generator().manual_seed(int(config.get("seed", 0)))
    spec = task.gate_spec()
    gate = build_gate(spec, config["width"])  # N outputs: one predicted score per expert
    c_g = count_macs(gate, spec.scaled(config["width"]).input_shape)
    optimizer = torch.optim.Adam(gate.parameters(), lr=config["lr"])
    train = data["train"]
    mean, std = train.scores.mean(), max(train.scores.std(), 1e-12)  # one scale for all experts
    x_train = task.gate_tensor(train.gate)
    y_train = torch.as_tensor((train.scores - mean) / std, dtype=torch.float32)
    batch = min(int(config["batch_size"]), len(y_train))

    def predict(split: SplitData) -> np.ndarray:
        gate.eval()
        with torch.no_grad():
            return gate(task.gate_tensor(split.gate)).numpy() * std + mean

    for epoch in range(1, int(config["epochs"]) + 1):
        gate.train()
        total, steps = 0.0, 0
        for idx in _batches(len(y_train), batch, gen):
            optimizer.zero_grad(set_to_none=True)
            loss = score_loss(gate(augment(task, x_train[idx], gen)), y_train[idx])
            loss.backward()
            optimizer.step()
            total, steps = total + float(loss), steps + 1
        val_pred = predict(data["val"])
        val_err = float(np.mean((val_pred - data["val"].scores) ** 2))
        report({"epoch": epoch, "train_loss": total / max(steps, 1), "val_score_mse": val_err})
    val_pred, test_pred = predict(data["val"]), predict(data["test"])
    points = []
    for d_t in config["targets"]:
        lam = calibrate_lambda(val_pred, d, d_t)  # the budget's price of data, set on validation
        assignment = lagrange_assignment(test_pred, d, lam).numpy()
        points.append({**_point(task, data["test"], assignment, d, d_t), "lambda": lam})
    return {"points": points, "C_g": c_g,
            "gate": gate_bundle(gate, config, score_mean=float(mean), score_std=float(std))}


def gate_bundle(gate: Gate, config: dict, **extra) -> dict:
    """A trained gate as plain values and tensors (torch.load(weights_only=True) reads it back):
    what serving needs to rebuild it and its task. extra: score_mean/score_std (lagrange: the
    gate predicts standardised scores), d_target and bias (soft/enforce)."""
    return {"task": config["task"], "profile": config["profile"], "options": dict(config.get("options") or {}),
            "method": config["method"], "width": float(config["width"]),
            "state_dict": {k: v.detach().cpu().clone() for k, v in gate.state_dict().items()}, **extra}


def save_gate(bundle: dict, path: AnyPath) -> AnyPath:
    save_torch(bundle, path)
    return path


def load_gate(path: AnyPath) -> tuple[Gate, dict]:
    """The gate saved by save_gate, in eval mode on the CPU, and its bundle (without weights)."""
    bundle = load_torch(path)
    task = get_task(bundle["task"], bundle["profile"], bundle["options"])
    gate = build_gate(task.gate_spec(), bundle["width"])
    gate.load_state_dict(bundle.pop("state_dict"))
    return gate.eval(), bundle

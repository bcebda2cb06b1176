"""One sweep trial: a selection method (pipelines/methods.py lists them) evaluated at one or
more data-cost targets, from the expert cache only (no expert ever runs here).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from pipelines.gate_inputs import GateInputs
from pipelines.methods import Method, TrialConfig
from pipelines.points import Point, TrialResult

from bmoe.bias import select_bias
from bmoe.gating import Gate, build_gate, count_macs, enforced_gates, gate_step
from bmoe.lagrange import calibrate_lambda, lagrange_assignment, score_loss
from bmoe.routing import enforce_bias
from bmoe.stream import DEFAULT_WINDOW, STREAM_SEED, stream_order, streamed_assignment
from storage import AnyPath, read_table, save_torch
from tasks import GATE_SPLIT, TaskRef

EVAL_BATCH = 1024  # gate inputs per forward pass when a split is routed
SHUFFLE_BUFFER_MB = 64  # gate inputs held to shuffle training batches (the whole split when smaller)
BUDGET_TOLERANCE = 0.10  # a gate may spend up to this fraction over its target on validation
SOFT_TOLERANCE = 0.05  # soft regularisation: its d_mean must land this near d_t on validation, either side
# (tighter than the demo's 10 % on test: argmax routing's share drifts between splits of a few hundred inputs)


def budget_objective(performance: float, d_mean: float, d_t: float, p_val: np.ndarray,
                     two_sided: bool = False) -> float:
    """The validation figure that model selection (epochs, hyperparameters) and early stopping
    maximise: the performance while the mixture keeps d_mean within BUDGET_TOLERANCE of d_t;
    beyond it, below what any useful in-budget gate scores (the worst single expert's
    performance, or less) and lower the further off, so the least overspending wins.
    two_sided (soft regularisation, whose job is to meet its bias b, eq. 5): d_mean must lie
    within SOFT_TOLERANCE of d_t on either side (a soft gate that collapsed onto the cheapest
    expert otherwise counted as in budget)."""
    ratio = d_mean / max(d_t, 1e-12) - 1.0
    over = abs(ratio) - SOFT_TOLERANCE if two_sided else ratio - BUDGET_TOLERANCE
    if over <= 0:
        return float(performance)
    spread = float(np.ptp(p_val)) or 1.0
    return float(min(performance, float(np.min(p_val))) - spread * (1.0 + over))


class CacheMismatch(ValueError):
    """The expert cache does not line up with the gate shards (made from another prepare)."""


@dataclass
class SplitData:
    """What a trial needs of one split: its gate inputs (streamed, as stored) and the cached
    per-expert columns (small: a few numbers per sample)."""

    gate_inputs: GateInputs  # (M, ...) the stored "gate" column, read in batches
    cache: pd.DataFrame  # one row per sample, in the gate stream's order
    losses: np.ndarray  # (M, N) per-sample expert losses
    scores: np.ndarray  # (M, N) per-sample additive scores


def load_split(cache_file: AnyPath, gate_files: list[AnyPath], n_experts: int, full: bool = True) -> SplitData:
    """One split, read on the trial's node. full=False keeps only the cache's loss and score
    columns (all a training split needs). The cache must list the gate shards' rows in order."""
    columns = None if full else ["sample_id", *(f"{c}_{n}" for c in ("loss", "score") for n in range(n_experts))]
    cache = read_table(cache_file, columns=columns).to_pandas()
    gate = GateInputs(gate_files)
    ids = gate.sample_ids()
    if len(ids) != len(cache) or not np.array_equal(ids.astype(str), cache["sample_id"].to_numpy().astype(str)):
        raise CacheMismatch(f"the expert cache {cache_file} does not list the samples of the gate shards "
                            f"({len(cache)} vs {len(ids)} rows, or another order): rerun `bmoe cache`")
    return SplitData(gate_inputs=gate, cache=cache, losses=_matrix(cache, "loss", n_experts),
                     scores=_matrix(cache, "score", n_experts))


def _matrix(table: pd.DataFrame, column: str, n_experts: int) -> np.ndarray:
    return np.stack([table[f"{column}_{n}"].to_numpy(dtype=np.float64) for n in range(n_experts)], axis=1)


def trial_device() -> torch.device:
    """The GPU Ray gave this trial (CUDA_VISIBLE_DEVICES holds only it), else the CPU."""
    import ray

    if ray.is_initialized() and ray.get_gpu_ids() and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def to_device(task, x: np.ndarray, device: torch.device) -> torch.Tensor:
    """A batch of stored gate inputs: moved in its stored dtype, converted to float there."""
    return task.gate_tensor(torch.from_numpy(x).to(device, non_blocking=True))


def gate_logits(task, gate, split: SplitData, device: torch.device) -> torch.Tensor:
    """(M, N) gate outputs over a whole split, EVAL_BATCH inputs at a time, on the CPU."""
    gate.eval()
    out = []
    with torch.no_grad():
        for _, x in split.gate_inputs.batches(EVAL_BATCH):
            out.append(gate(to_device(task, x, device)).float().cpu())
    return torch.cat(out) if out else torch.zeros((0, split.losses.shape[1]))


def run_trial(config: TrialConfig, data: dict[str, SplitData], report=None,
              device: torch.device | None = None) -> TrialResult:
    """Evaluate one configuration on data's "gate" (training gates), "val" and "test" splits,
    training on `device` (default: the GPU Ray gave this trial, else the CPU); reports per-epoch
    metrics through `report` (Tune's, unless given: a trial can run without Tune) and returns its
    TrialResult, one Point per target (pipelines/points.py)."""
    if report is None:
        from ray import tune

        report = tune.report
    task = config.ref.task()
    d = task.data_costs()
    p_val = expert_performance(task, data["val"])
    if not config.spec.trains_gate:
        points = [_static_point(task, config.spec, data, d, p_val, d_t, config.seed) for d_t in config.targets]
        return TrialResult(points=tuple(Point.from_dict(p) for p in points),
                           val_objective=float(np.mean([p["val_objective"] for p in points])))
    train = _train_biased_gate if config.spec.per_target else _train_lagrange_gate
    return train(task, config, data, d, p_val, report, device or trial_device())


def expert_performance(task, split: SplitData) -> np.ndarray:
    """(N,) each single expert's task metric over the whole split."""
    n_experts = split.losses.shape[1]
    M = len(split.cache)
    return np.array([task.metric(split.cache, np.full(M, n))["performance"] for n in range(n_experts)])


def _static_point(task, spec: Method, data: dict[str, SplitData], d, p_val, d_t: float, seed: int) -> dict:
    """One target of a static method on test, with its performance on validation beside it (the
    same rule applied to the validation split), so every method's points carry the same keys."""
    b = select_bias(d, p_val, d_t)
    test = data["test"]
    if spec.rule is None:  # the LP mix of single experts: every figure is b . (the experts' figures)
        M = len(test.cache)
        per_expert = [task.metric(test.cache, np.full(M, n)) for n in range(len(d))]
        mixed = {key: float(sum(bn * m[key] for bn, m in zip(b, per_expert))) for key in per_expert[0]}
        return {"d_target": d_t, "d_mean": float(b @ d), **mixed, "share": b.tolist(), "b": b.tolist(),
                "val_performance": float(b @ p_val), "val_objective": budget_objective(b @ p_val, b @ d, d_t, p_val)}
    point = _point(task, test, spec.rule(task, test, d, b, d_t, seed), d, d_t, b)
    return {**point, **_validation(task, data["val"], spec.rule(task, data["val"], d, b, d_t, seed), d, d_t, p_val)}


def _routing_figures(task, split: SplitData, assignment: np.ndarray, d) -> dict:
    """Mixture metric, data cost actually spent and each expert's share of one routing: what
    model selection needs after every epoch."""
    metrics = task.metric(split.cache, assignment)
    share = np.bincount(assignment, minlength=len(d)) / max(len(assignment), 1)
    return {"d_mean": float(np.asarray(d)[assignment].mean()), **{k: float(v) for k, v in metrics.items()},
            "share": share.tolist()}


def as_served(task, split: SplitData, d, d_t: float, val_values: np.ndarray, values: np.ndarray) -> dict:
    """What a deployment of the gate delivers on `split` at d_t: a fresh router stream's choices
    (its price calibrated on val_values) with the split's requests in the canonical order
    (bmoe.stream), scored as the batch point is. `bmoe replay` sends the same order."""
    order = stream_order(split.cache[task.request_column].to_numpy(), split.cache["sample_id"].to_numpy())
    figures = _routing_figures(task, split, streamed_assignment(d, d_t, val_values, values, order), d)
    return {"performance": figures["performance"], "d_mean": figures["d_mean"], "share": figures["share"],
            "window": DEFAULT_WINDOW, "stream_seed": STREAM_SEED}


def _point(task, split: SplitData, assignment: np.ndarray, d, d_t: float, b=None) -> dict:
    """Mixture metric and data cost actually spent, plus each expert on its assigned inputs."""
    assigned = []
    for n in range(len(d)):
        mask = assignment == n
        assigned.append(float(task.metric(split.cache[mask], np.full(int(mask.sum()), n))["performance"])
                        if mask.any() else None)
    return {
        "d_target": float(d_t),
        **_routing_figures(task, split, assignment, d),
        "assigned_performance": assigned,
        **({"b": np.asarray(b).tolist()} if b is not None else {}),
    }


def _validation(task, split: SplitData, assignment: np.ndarray, d, d_t: float, p_val) -> dict:
    """A point's validation figures: the performance and the budget objective model selection uses."""
    performance = float(task.metric(split.cache, assignment)["performance"])
    d_mean = float(np.asarray(d)[assignment].mean())
    return {"val_performance": performance, "val_objective": budget_objective(performance, d_mean, d_t, p_val)}


def sample_weights(task, split: SplitData) -> np.ndarray:
    """(M,) the task's first-order weight of each sample in its metric (ones if it has none):
    it makes the oracle's additive scores track a metric that pools before a nonlinearity.
    (Weighting the gate's training losses the same way was measured worse on superres:
    -0.3 to -1.1 dB at d_max/2 and 0.6 d_max, so the gate trains on the cached losses.)"""
    return task.sample_weights(split.cache)


def augment(task, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """The task's label-preserving augmentation of a batch of gate inputs, if it has one."""
    return task.augment_gate(x, gen)


def _batches(split: SplitData, batch: int, gen: torch.Generator):
    """One epoch's training batches, shuffled; full batches only: quotas need M * b_n inputs."""
    buffer_rows = max(batch, int(SHUFFLE_BUFFER_MB * (1 << 20) / max(split.gate_inputs.row_bytes, 1)))
    yield from split.gate_inputs.batches(batch, gen=gen, buffer_rows=buffer_rows, drop_last=True)


def _train_biased_gate(task, config: TrialConfig, data: dict[str, SplitData], d, p_val, report,
                       device: torch.device) -> TrialResult:
    spec, d_t = config.spec, float(config.d_target)
    b = select_bias(d, p_val, d_t)  # eqs. 6-8 on validation performance
    if np.count_nonzero(b > 1e-9) == 1:
        return _single_expert_trial(task, data, d, d_t, b, p_val)
    gen = torch.Generator().manual_seed(config.gate_seed)
    torch.manual_seed(config.gate_seed)
    gate = build_gate(task.gate_spec(), config.width)
    c_g = count_macs(gate, task.gate_spec().scaled(config.width).input_shape)
    gate = gate.to(device)
    optimizer = torch.optim.Adam(gate.parameters(), lr=config.lr)
    train = data[GATE_SPLIT]  # inputs the experts never trained on
    # Scaling the losses by one constant leaves the optimum unchanged and keeps lr meaningful.
    losses = torch.as_tensor(train.losses / max(train.losses.mean(), 1e-12), dtype=torch.float32, device=device)
    batch = min(config.batch_size, len(losses))

    def route(split: SplitData) -> np.ndarray:
        logits = gate_logits(task, gate, split, device)
        if spec.routes_with_quotas:  # test batches are routed with the same quotas
            return enforce_bias(enforced_gates(logits, b), b).numpy()
        return logits.argmax(dim=1).numpy()

    best, best_state, best_val = -np.inf, None, {"performance": float("nan"), "d_mean": float("nan")}
    for epoch in range(1, config.epochs_on(len(losses)) + 1):
        total, steps = 0.0, 0
        for idx, x in _batches(train, batch, gen):
            stats = gate_step(gate, optimizer, augment(task, to_device(task, x, device), gen),
                              losses[torch.from_numpy(idx).to(device)], spec.objective, b, config.w_bias)
            total, steps = total + stats["loss"], steps + 1
        val = _routing_figures(task, data["val"], route(data["val"]), d)
        objective = budget_objective(val["performance"], val["d_mean"], d_t, p_val, two_sided=spec.two_sided_budget)
        report({"epoch": epoch, "train_loss": total / max(steps, 1), "val_performance": val["performance"],
                "val_objective": objective, "val_d_mean": val["d_mean"],
                **{f"val_u_{n}": u for n, u in enumerate(val["share"])}})
        # model selection on validation: the best epoch within the budget's tolerance
        if objective > best:
            best, best_val, best_state = objective, val, {k: v.clone() for k, v in gate.state_dict().items()}
    if best_state is not None:
        gate.load_state_dict(best_state)
    test_assignment = route(data["test"])
    chosen = {"val_performance": float(best_val["performance"]), "val_objective": float(best),
              "val_d_mean": float(best_val["d_mean"])}
    log_probs = [torch.log_softmax(gate_logits(task, gate, data[s], device).double(), dim=1).numpy()
                 for s in ("val", "test")]  # the values a router trades against cost (serving.loading.gate_values)
    point = {**_point(task, data["test"], test_assignment, d, d_t, b), **chosen,
             "served": as_served(task, data["test"], d, d_t, *log_probs)}
    return TrialResult(points=(Point.from_dict(point),), **chosen, C_g=c_g, test_assignment=test_assignment,
                       gate=gate_bundle(gate, config, d_target=d_t, bias=b.tolist(),
                                        val_values=torch.from_numpy(log_probs[0])))


def _single_expert_trial(task, data: dict[str, SplitData], d, d_t: float, b, p_val) -> TrialResult:
    """A one-hot bias (d_t at an end of [d_min, d_max]) leaves a gate nothing to choose: every
    input goes to that expert, as Algorithm 1 and a bias term strong enough to meet b both do.
    No gate is trained or saved (C_g 0); soft regularisation trained there overspent d_min
    1.8-3.3 times at every w_bias in 1-100 (demo, measured)."""
    n = int(np.argmax(b))
    val = _validation(task, data["val"], np.full(len(data["val"].cache), n), d, d_t, p_val)
    test_assignment = np.full(len(data["test"].cache), n)
    chosen = {**val, "val_d_mean": float(d[n])}
    return TrialResult(points=(Point.from_dict({**_point(task, data["test"], test_assignment, d, d_t, b), **chosen}),),
                       **chosen, test_assignment=test_assignment)


def _train_lagrange_gate(task, config: TrialConfig, data: dict[str, SplitData], d, p_val, report,
                         device: torch.device) -> TrialResult:
    torch.manual_seed(config.gate_seed)
    gen = torch.Generator().manual_seed(config.gate_seed)
    spec = task.gate_spec()
    gate = build_gate(spec, config.width)  # N outputs: one predicted score per expert
    c_g = count_macs(gate, spec.scaled(config.width).input_shape)
    gate = gate.to(device)
    optimizer = torch.optim.Adam(gate.parameters(), lr=config.lr)
    train = data[GATE_SPLIT]  # inputs the experts never trained on
    mean, std = train.scores.mean(), max(train.scores.std(), 1e-12)  # one scale for all experts
    y_train = torch.as_tensor((train.scores - mean) / std, dtype=torch.float32, device=device)
    batch = min(config.batch_size, len(y_train))

    def predict(split: SplitData) -> np.ndarray:
        return gate_logits(task, gate, split, device).numpy() * std + mean

    for epoch in range(1, config.epochs_on(len(y_train)) + 1):
        gate.train()
        total, steps = 0.0, 0
        for idx, x in _batches(train, batch, gen):
            optimizer.zero_grad(set_to_none=True)
            loss = score_loss(gate(augment(task, to_device(task, x, device), gen)),
                              y_train[torch.from_numpy(idx).to(device)])
            loss.backward()
            optimizer.step()
            total, steps = total + loss.item(), steps + 1
        val_pred = predict(data["val"])
        val_err = float(np.mean((val_pred - data["val"].scores) ** 2))
        report({"epoch": epoch, "train_loss": total / max(steps, 1), "val_score_mse": val_err})
    val_pred, test_pred = predict(data["val"]), predict(data["test"])
    points = []
    for d_t in config.targets:
        # The budget's price of data, set on the inputs being routed from the gate's predictions
        # alone (no labels), as enforce sets its quotas on them: a price carried over from
        # validation overspent the test budget by up to 13 % (detection demo).
        lam_val, lam = calibrate_lambda(val_pred, d, d_t), calibrate_lambda(test_pred, d, d_t)
        assignment = lagrange_assignment(test_pred, d, lam).numpy()
        points.append({**_point(task, data["test"], assignment, d, d_t), "lambda": lam,
                       "served": as_served(task, data["test"], d, d_t, val_pred, test_pred),
                       **_validation(task, data["val"], lagrange_assignment(val_pred, d, lam_val).numpy(), d, d_t,
                                     p_val)})
    return TrialResult(points=tuple(Point.from_dict(p) for p in points), C_g=c_g,
                       val_objective=float(np.mean([p["val_objective"] for p in points])),
                       gate=gate_bundle(gate, config, score_mean=float(mean), score_std=float(std),
                                        val_values=torch.from_numpy(val_pred)))


def gate_bundle(gate: Gate, config: TrialConfig, **extra) -> dict:
    """A trained gate as plain values and tensors (torch.load(weights_only=True) reads it back):
    what serving needs to rebuild it and its task. extra: score_mean/score_std (lagrange: the
    gate predicts standardised scores), d_target and bias (soft/enforce), val_values (M, N): the
    values a router trades against cost on the validation split, on which its budget calibrates
    (a replica then starts without reading the split, and prices as the report's as-served rows)."""
    return {"task": config.task_name, "profile": config.profile, "options": dict(config.options),
            "method": config.method, "width": float(config.width),
            "state_dict": {k: v.detach().cpu().clone() for k, v in gate.state_dict().items()}, **extra}


def save_gate(bundle: dict, path: AnyPath) -> AnyPath:
    save_torch(bundle, path)
    return path


def gate_from_bundle(bundle: dict) -> tuple[Gate, dict]:
    """The gate a bundle saved by save_gate describes (read from a file or the registry), in
    eval mode on the CPU, and the bundle without its weights."""
    task = TaskRef.from_dict(bundle).task()
    gate = build_gate(task.gate_spec(), bundle["width"])
    gate.load_state_dict(bundle.pop("state_dict"))
    return gate.eval(), bundle

"""The selection methods a sweep compares, what each one is and how it behaves, in one table:
sweep, search, gate_trial, report, compare and serving ask it instead of comparing method names
(pipelines/README.md: adding a method).

A trial is a TrialConfig: typed, checked when made, and turned into Tune's plain dict only at
the edge (sweep's param_space, the search's suggestions, the sweep record's JSON).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Callable

import numpy as np

from tasks.typed_values import typed_fields

HEURISTIC_BATCH = 1024  # gate inputs per call of a task's heuristic


def _random_rule(task, split, d, b, d_t: float, seed: int) -> np.ndarray:
    """Random selection with exact quotas K_n = M b_n."""
    import torch

    from bmoe.routing import random_assignment

    return random_assignment(len(split.cache), b, torch.Generator().manual_seed(seed)).numpy()


def _oracle_rule(task, split, d, b, d_t: float, seed: int) -> np.ndarray:
    """Every expert's per-input score known, weighted as the task's metric pools them."""
    from bmoe.routing import oracle_assignment

    return oracle_assignment(split.scores * task.sample_weights(split.cache)[:, None], d, d_t).numpy()


def _heuristic_rule(task, split, d, b, d_t: float, seed: int) -> np.ndarray:
    """The task's hand-made difficulty per input, with random's quotas: easiest inputs cheapest."""
    parts = []
    for _, x in split.gate_inputs.batches(HEURISTIC_BATCH):
        value = task.heuristic(x)
        if value is None:
            raise ValueError(f"task {task.name} has no heuristic router")
        parts.append(np.asarray(value))
    return quantile_assignment(np.concatenate(parts) if parts else np.zeros(0), b, d)


def quantile_assignment(difficulty: np.ndarray, b, d) -> np.ndarray:
    """Exact quotas K_n; the easiest inputs go to the cheapest expert, the hardest to the dearest."""
    from bmoe.routing import quotas

    K = quotas(len(difficulty), b)
    by_cost = np.argsort(d, kind="stable")
    order = np.argsort(difficulty, kind="stable")  # easiest first
    assignment = np.empty(len(difficulty), dtype=np.int64)
    start = 0
    for n in by_cost:
        assignment[order[start:start + K[n]]] = n
        start += K[n]
    return assignment


@dataclass(frozen=True)
class Method:
    """One selection method: what it is, and how it trains, routes and is selected."""

    name: str
    trains_gate: bool  # a gate is trained from the cache (else the rule needs no training)
    per_target: bool  # one trial per d_t; else one trial covers every target
    servable: bool  # its gate gives every expert a value the serving router trades against cost
    searched: tuple[str, ...]  # the hyperparameters a sweep varies for it
    summary: str
    gate_output: str = ""  # what its gate's outputs are: "logits" (a choice), "scores" (predicted)
    # (task, split, d, b, d_t, seed) -> (M,) experts: a static method's routing; a static method
    # without one is the LP mix of single experts, whose figures are b . (the experts' figures)
    rule: Callable | None = None
    objective: str = ""  # a per-target gate's training objective, a key of bmoe.gating.OBJECTIVES
    routes_with_quotas: bool = False  # val and test are routed with Algorithm 1's quotas (else argmax)
    two_sided_budget: bool = False  # model selection also penalises spending under d_t
    own_grid: bool = False  # a sweep gives it the grid's enforce_lrs, enforce_batch_sizes and enforce_inits


SEARCHED = ("lr", "batch_size", "width", "w_bias")  # what a search samples (pipelines/search.py: space)
HYPERPARAMETERS = SEARCHED + ("init",)  # what tells a point's trials apart; validation picks among them

TABLE = (  # in the order reports list them
    Method("experts", False, False, False, (), "the LP mix of single experts (the paper's dotted line): b.p at b.d = d_t"),
    Method("random", False, False, False, (), "random selection with exact quotas K_n = M b_n (the paper's lower bound)",
           rule=_random_rule),
    Method("heuristic", False, False, False, (), "a hand-made difficulty per input (the task's), quotas as random",
           rule=_heuristic_rule),
    Method("soft", True, True, True, SEARCHED,
           "gate trained with soft bias regularisation (eqs. 3-5), argmax at test time", "logits",
           objective="soft", two_sided_budget=True),
    Method("enforce", True, True, True, SEARCHED[:3],
           "gate trained with batchwise bias enforcement (Algorithm 1), enforced at test time", "logits",
           objective="enforce", routes_with_quotas=True, own_grid=True),
    Method("lagrange", True, False, True, SEARCHED[:3],
           "gate regressing every expert's score; routes by score - lambda d (our extension)", "scores"),
    Method("oracle", False, False, False, (), "every expert's per-input score known: the upper bound no gate can beat",
           rule=_oracle_rule),
)
METHODS = {m.name: m for m in TABLE}
NAMES = tuple(METHODS)
STATIC = tuple(m.name for m in TABLE if not m.trains_gate)  # no training: every target in one trial
PER_TARGET_GATES = tuple(m.name for m in TABLE if m.trains_gate and m.per_target)  # a gate per d_t (soft, enforce)
ALL_TARGET_GATES = tuple(m.name for m in TABLE if m.trains_gate and not m.per_target)  # one for every d_t (lagrange)
SERVABLE = tuple(m.name for m in TABLE if m.servable)
BOUNDS = ("random", "oracle")  # routing efficiency is measured between them


def method(name: str) -> Method:
    """The table's entry; ValueError naming the known methods otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; choose from {', '.join(NAMES)}") from None


def epochs_for_steps(steps: int, batch_size: int, rows: int) -> int:
    """Epochs of full batches (a gate trains on full batches only) that make at least `steps` steps."""
    per_epoch = max(rows // max(min(batch_size, rows), 1), 1)
    return max(1, -(-steps // per_epoch))


@dataclass(frozen=True)
class TrialConfig:
    """One sweep trial. d_target for a per-target method, targets for one that covers them all;
    batch_size, lr, width (and w_bias, soft's alone) for a method that trains a gate."""

    task_name: str
    profile: str
    method: str
    options: dict = field(default_factory=dict)
    seed: int = 0
    epochs: int = 1
    steps: int = 0  # 0: train for epochs; else for this many optimizer steps (epochs derived from the gate split)
    d_target: float | None = None
    targets: tuple[float, ...] | None = None
    batch_size: int | None = None
    lr: float | None = None
    width: float | None = None
    w_bias: float = 0.0
    init: int = 0  # which draw of the gate's initial weights (0: the seed's own); a grid's restarts

    def __post_init__(self):
        m = method(self.method)
        if (self.d_target is None, self.targets is None) != (not m.per_target, m.per_target):
            raise ValueError(f"a {self.method} trial takes {'a d_target' if m.per_target else 'targets'}")
        if m.trains_gate and None in (self.batch_size, self.lr, self.width):
            raise ValueError(f"a {self.method} trial needs batch_size, lr and width")
        if self.w_bias and "w_bias" not in m.searched:
            raise ValueError(f"{self.method} has no w_bias (the bias term is soft regularisation's)")
        if self.init and not m.trains_gate:
            raise ValueError(f"{self.method} has no gate to initialise")

    @property
    def gate_seed(self) -> int:
        """What seeds the gate's initial weights and batch order: the run's seed for init 0."""
        return self.seed + 1000 * self.init

    def epochs_on(self, rows: int) -> int:
        """Epochs over a gate split of `rows` inputs: epochs, or those that make `steps` steps."""
        return epochs_for_steps(self.steps, self.batch_size or rows, rows) if self.steps else self.epochs

    @property
    def ref(self):
        """The trial's task by reference (tasks.TaskRef)."""
        from tasks import TaskRef

        return TaskRef(self.task_name, self.profile, dict(self.options), self.seed)

    @property
    def spec(self) -> Method:
        return method(self.method)

    def as_tune(self) -> dict:
        """Tune's plain dict (JSON-able): the fields a trial has, none that are unset, under the
        keys sweep records have always used ("task" for task_name); w_bias for the per-target
        gates (0 for enforce: both carry the same keys in records and MLflow)."""
        out = {("task" if k == "task_name" else k): v for k, v in asdict(self).items() if v is not None}
        if not (self.spec.trains_gate and self.spec.per_target):
            out.pop("w_bias")
        if not self.init:  # the seed's own draw: keys as sweeps recorded them before restarts
            out.pop("init")
        if "targets" in out:
            out["targets"] = list(out["targets"])
        return out

    @classmethod
    def from_tune(cls, config: dict) -> "TrialConfig":
        """From Tune's dict, or a sweep record's; keys that are not fields (Tune's own) are dropped."""
        known = {f.name for f in fields(cls)}
        values = {("task_name" if k == "task" else k): v for k, v in config.items()}
        values = typed_fields(cls, {k: v for k, v in values.items() if k in known}, "trial setting")
        values["options"] = dict(values.get("options") or {})
        return cls(**values)

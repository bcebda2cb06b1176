"""A sweep's results, typed from the trial to the report: the one place that lists a point's fields.

A trial (pipelines/gate_trial.py) returns a TrialResult holding one Point per target. The
point's JSON form (Point.as_dict, flat, the keys sweep records have always held) is what Tune
carries and the sweep record stores; Point.from_dict reads it back for the report, serving and
`bmoe replay`; Point.mlflow is the one key scheme of its MLflow run, and Point.from_mlflow reads it
back for `bmoe compare`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Mapping

import numpy as np

from pipelines.methods import HYPERPARAMETERS

__all__ = ["Point", "TrialResult"]

_JSON_NAMES = {"price": "lambda"}  # field -> its key in records (lagrange's price of data, lambda)


@dataclass(frozen=True)
class Point:
    """One (method, d_t) operating point, measured on test, with validation beside it."""

    d_target: float  # the data-cost target d_t, bytes per input
    d_mean: float  # the mean data cost actually spent on test
    performance: float  # the task's metric on test (its primary: PSNR, AP@0.5, accuracy)
    share: tuple[float, ...]  # the fraction of test inputs each expert got
    val_performance: float | None = None  # the same routing rule on validation
    val_objective: float | None = None  # what model selection maximises (gate_trial.budget_objective)
    val_d_mean: float | None = None
    b: tuple[float, ...] | None = None  # the LP's bias (eqs. 6-8) at d_t
    assigned_performance: tuple[float | None, ...] | None = None  # each expert on the inputs it got
    served: dict | None = None  # as a deployment delivers it (gate_trial.as_served)
    price: float | None = None  # lagrange: the price of data lambda its routing used
    hyperparameters: dict | None = None  # the chosen trial's, where the report picked one per target
    secondary: dict = field(default_factory=dict)  # the task's other test metrics (detection: map_50_95)

    @classmethod
    def from_dict(cls, values: Mapping) -> "Point":
        """From a point's JSON form, or the figures a trial computes (unknown numeric keys are
        the task's secondary metrics)."""
        names = {f.name for f in fields(cls)} - {"secondary"}
        keys = {_JSON_NAMES.get(name, name): name for name in names}
        known = {keys[k]: v for k, v in values.items() if k in keys}
        for name in ("share", "b", "assigned_performance"):
            if known.get(name) is not None:
                known[name] = tuple(known[name])
        secondary = {k: v for k, v in values.items() if k not in keys and k != "secondary"}
        return cls(**known, secondary={**dict(values.get("secondary") or {}), **secondary})

    def as_dict(self) -> dict:
        """The JSON form: flat, unset fields left out, the secondary metrics beside the primary."""
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "secondary" or value is None:
                continue
            out[_JSON_NAMES.get(f.name, f.name)] = list(value) if isinstance(value, tuple) else value
        return {**out, **self.secondary}

    def mlflow(self, config: Mapping, c_g: float) -> tuple[dict[str, str], dict[str, float]]:
        """The keys every method's point carries in MLflow: params method, d_target (one string
        per target for every method, so params.d_target = '...' lines them up) and the
        hyperparameters the method has; metrics val_performance, val_objective,
        test_performance, d_mean, u_<n>, C_g, the task's secondary metrics as test_<name>,
        lambda, and served_performance / served_d_mean."""
        params = {"method": config["method"], "d_target": f"{float(self.d_target):.6g}"}
        params.update({k: str(config[k]) for k in HYPERPARAMETERS if k in config})
        nan = float("nan")
        val = nan if self.val_performance is None else self.val_performance
        metrics = {"val_performance": val, "val_objective": val if self.val_objective is None else self.val_objective,
                   "test_performance": self.performance, "d_mean": self.d_mean, "C_g": c_g,
                   **{f"u_{n}": u for n, u in enumerate(self.share)}}
        metrics.update({f"test_{k}": v for k, v in self.secondary.items() if isinstance(v, (int, float))})
        if self.price is not None:
            metrics["lambda"] = self.price
        if self.served is not None:  # what a deployment of the gate delivers (bmoe.stream)
            metrics.update({"served_performance": self.served["performance"],
                            "served_d_mean": self.served["d_mean"]})
        return params, {k: float(v) for k, v in metrics.items()}

    @classmethod
    def from_mlflow(cls, params: Mapping[str, str], metrics: Mapping[str, float]) -> "Point":
        """The point a run logged with `mlflow` (its hyperparameters as MLflow keeps them: text)."""
        def figure(key: str) -> float | None:
            value = metrics.get(key)
            return None if value is None or value != value else float(value)  # NaN: not measured

        shares = sorted((int(k[2:]), v) for k, v in metrics.items() if k.startswith("u_") and k[2:].isdigit())
        served = None
        if "served_performance" in metrics:
            served = {"performance": metrics["served_performance"], "d_mean": metrics["served_d_mean"]}
        return cls(d_target=float(params["d_target"]), d_mean=metrics["d_mean"],
                   performance=metrics["test_performance"], share=tuple(v for _, v in shares),
                   val_performance=figure("val_performance"), val_objective=figure("val_objective"),
                   price=figure("lambda"), served=served,
                   hyperparameters={k: params[k] for k in HYPERPARAMETERS if k in params} or None,
                   secondary={k[len("test_"):]: v for k, v in metrics.items()
                              if k.startswith("test_") and k != "test_performance"})


@dataclass(frozen=True)
class TrialResult:
    """What one trial returns: its points (one per target), the figures model selection reads,
    and what it leaves for serving and the report's figures."""

    points: tuple[Point, ...]
    val_objective: float
    val_performance: float | None = None
    val_d_mean: float | None = None
    C_g: int = 0  # the gate's multiply-adds per input (0: no gate)
    test_assignment: np.ndarray | None = field(default=None, compare=False)  # (M,) per-target gates
    gate: dict | None = field(default=None, compare=False)  # the trained gate (gate_trial.gate_bundle)

"""Model selection on validation: of the trials of one method at one target (several when the
sweep varies hyperparameters), the one with the best validation figure. The report, the
comparison and serving all choose with these functions, so they always agree."""

from __future__ import annotations

import math
from typing import Callable, Hashable, Iterable, Mapping, TypeVar

T = TypeVar("T")


def validation_figure(values: Mapping) -> float | None:
    """What selection maximises, from a trial record, a point or an MLflow run's metrics: the
    budget-aware validation objective where recorded (pipelines.gate_trial.budget_objective: a
    gate that overspends its target ranks below every gate that keeps it), else validation
    performance (records from before the objective existed)."""
    value = values.get("val_objective")
    return values.get("val_performance") if value is None else value


def best_on_validation(items: Iterable[T], key: Callable[[T], Hashable],
                       val: Callable[[T], float | None]) -> dict[Hashable, T]:
    """{key(item): the item with the highest val(item)} per key, e.g. key = (method, d_target).
    A missing or NaN validation figure ranks last; among equals the first item is kept."""
    chosen: dict[Hashable, T] = {}
    score: dict[Hashable, float] = {}
    for item in items:
        k, v = key(item), val(item)
        v = -math.inf if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
        if k not in chosen or v > score[k]:
            chosen[k], score[k] = item, v
    return chosen

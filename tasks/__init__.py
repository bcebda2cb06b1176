"""The tasks, plugged in by an explicit registry (no filename scanning)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from tasks.base import GATE_SPLIT, SCORED_SPLITS, SOURCE_SPLITS, SPLITS, BadInput, TaskBase, UnreadableInput

__all__ = ["SPLITS", "SCORED_SPLITS", "SOURCE_SPLITS", "GATE_SPLIT", "BadInput", "UnreadableInput", "TaskBase", "TASKS", "TaskRef", "get_task"]


def _detection(profile: str, options: dict) -> TaskBase:
    from tasks.detection import DetectionTask

    return DetectionTask.for_profile(profile, **options)


def _superres(profile: str, options: dict) -> TaskBase:
    from tasks.superres import SuperResTask

    return SuperResTask.for_profile(profile, **options)


def _action(profile: str, options: dict) -> TaskBase:
    from tasks.action import ActionTask

    return ActionTask.for_profile(profile, **options)


TASKS = {"detection": _detection, "superres": _superres, "action": _action}


def get_task(name: str, profile: str, options: dict | None = None) -> TaskBase:
    """The task `name` configured for `profile`, with `options` overriding its settings
    (e.g. {"model": "fsrcnn"}); a clear error for an unknown name or option."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}") from None
    return factory(profile, dict(options or {}))


@dataclass(frozen=True)
class TaskRef:
    """One task as every carrier names it: a stage's RunConfig, a sweep trial, the cache's
    scorer actors, the experts' Train loop, a saved gate and a served run. It pickles as these
    few values, and task() is the one way to build the task where it runs. In JSON records
    (Tune's configs, sweep records, gate bundles) it is as_dict(), under the keys they have
    always used."""

    name: str
    profile: str
    options: dict = field(default_factory=dict)  # the -o overrides of the profile's settings
    seed: int = 0

    def task(self) -> TaskBase:
        return get_task(self.name, self.profile, self.options)

    def as_dict(self) -> dict:
        return {"task": self.name, "profile": self.profile, "options": dict(self.options), "seed": int(self.seed)}

    @classmethod
    def from_dict(cls, values: Mapping) -> "TaskRef":
        """From as_dict()'s keys (a gate bundle has no seed: 0)."""
        return cls(values["task"], values["profile"], dict(values.get("options") or {}), int(values.get("seed", 0)))

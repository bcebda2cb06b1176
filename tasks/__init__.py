"""The tasks, plugged in by an explicit registry (no filename scanning)."""

from __future__ import annotations

from tasks.base import GATE_SPLIT, SCORED_SPLITS, SOURCE_SPLITS, SPLITS, BadInput, TaskBase, UnreadableInput

__all__ = ["SPLITS", "SCORED_SPLITS", "SOURCE_SPLITS", "GATE_SPLIT", "BadInput", "UnreadableInput", "TaskBase", "TASKS", "get_task"]


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

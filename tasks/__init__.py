"""The tasks, plugged in by an explicit registry (no filename scanning)."""

from __future__ import annotations

from tasks.base import SPLITS, BadInput, Task

__all__ = ["SPLITS", "BadInput", "Task", "TASKS", "get_task"]


def _superres(profile: str) -> Task:
    from tasks.superres import SuperResTask

    return SuperResTask.for_profile(profile)


TASKS = {"superres": _superres}


def get_task(name: str, profile: str) -> Task:
    """The task `name` configured for `profile`; a clear error for an unknown name."""
    try:
        factory = TASKS[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; available: {', '.join(sorted(TASKS))}") from None
    return factory(profile)

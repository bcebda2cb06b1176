"""UCF-101 action classification from codec motion vectors and RGB frames (section IV-D)."""

from tasks.action.task import PROFILES, ActionSettings, ActionTask

__all__ = ["ActionTask", "ActionSettings", "PROFILES"]

"""Super-resolution: ESPCN/FSRCNN experts at x4, x3, x2 on 64x64 patches (paper section IV-C)."""

from tasks.superres.task import PROFILES, SuperResSettings, SuperResTask

__all__ = ["SuperResTask", "SuperResSettings", "PROFILES"]

"""Single-shot detection: SSD experts at three input resolutions on COCO (paper section IV-B)."""

from tasks.detection.task import PROFILES, DetectionSettings, DetectionTask

__all__ = ["DetectionTask", "DetectionSettings", "PROFILES"]

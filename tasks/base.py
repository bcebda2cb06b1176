"""The task protocol: everything the generic pipeline stages need from a task.

The stages (pipelines/) never branch on a task's name; they call these methods. A task is
built from its frozen settings for a profile, and is pickled to Ray workers as it is.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from bmoe.gating import GateSpec

SPLITS = ("train", "val", "test")


class BadInput(ValueError):
    """A user's input file that cannot be used; the message names the file and the reason."""


@dataclass
class Listing:
    """The sources of one split (one dict per file or item) and the problems found listing them."""

    sources: list[dict]
    problems: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ExpertTraining:
    """How one expert is trained with Ray Train."""

    epochs: int
    batch_size: int
    lr: float


class Task(Protocol):
    """What a task module provides (see DESIGN.md section 2)."""

    name: str
    metric_name: str  # e.g. "PSNR (dB, Y channel)"
    target_columns: tuple[str, ...]  # travel with every P_n shard (the expert's targets)
    meta_columns: tuple[str, ...]  # scalar columns that travel with the gate shard into the cache

    # -- data ---------------------------------------------------------------------------
    def expert_names(self) -> list[str]: ...

    def data_costs(self) -> np.ndarray:
        """(N,) bytes of P_n(x) per input, K bytes per value."""

    def embedded_data(self, folder: Path) -> Path:
        """Write the embedded default data set in the task's real format; return its root."""

    def list_sources(self, data_root: Path, split: str) -> Listing: ...

    def load(self, source: dict) -> list[dict]:
        """Decode one source into sample rows: sample_id, group, gate, x<n>, enc<n>, targets, meta.

        Raises BadInput for a file that cannot be used.
        """

    # -- experts ------------------------------------------------------------------------
    def build_expert(self, n: int) -> nn.Module: ...

    def expert_training(self, n: int) -> ExpertTraining: ...

    def train_loss(self, n: int, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor: ...

    def evaluate(self, n: int, model: nn.Module, batch: dict[str, Any], device: torch.device) -> dict[str, np.ndarray]:
        """Per-sample columns for the cache: at least 'loss' (training signal for the gate)
        and 'score' (additive under the task metric: what the oracle maximises)."""

    # -- mixture ------------------------------------------------------------------------
    def metric(self, cache: pd.DataFrame, assignment: np.ndarray) -> dict[str, float]:
        """The task metric of a mixture whose sample i went to expert assignment[i].

        Returns {"performance": main metric, ...secondary metrics}.
        """

    def gate_spec(self) -> GateSpec: ...

    def gate_tensor(self, gate: np.ndarray) -> torch.Tensor:
        """(M, C, H, W) float gate inputs from the stored gate column."""

    def heuristic(self, gate: np.ndarray) -> np.ndarray | None:
        """(M,) hand-made difficulty per input (higher: needs more data), or None."""

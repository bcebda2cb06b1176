"""The task protocol: everything the generic pipeline stages need from a task.

The stages (pipelines/) never branch on a task's name; they call these methods. A task is
built from its frozen settings for a profile, and is pickled to Ray workers as it is.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import pandas as pd
import torch
from torch import nn

from bmoe.gating import GateSpec

if TYPE_CHECKING:
    from storage import StoragePath

SOURCE_SPLITS = ("train", "val", "test")  # the splits a data set defines (task.list_sources)
GATE_SPLIT = "gate"  # carved out of train: inputs the experts never train on, for training gates
SPLITS = ("train", GATE_SPLIT, "val", "test")  # every split prepare writes and cache scores


class BadInput(ValueError):
    """A user's input file that cannot be used; the message names the file and the reason."""


class UnreadableInput(BadInput):
    """An input file that the node loading it cannot read (not there, no permission, the object
    store refused or could not be reached): a problem of where the file is and who reads it, not of
    its content, which is a plain BadInput. The one-line message names the file and the node, e.g.
    "s3://b/x.png: cannot be read on node host1 (FileNotFoundError: ...)". Raised by
    tasks.inputs.read_input, which every task's load reads its file through."""


class InputTooSmall(BadInput):
    """A decodable input too small for the task (e.g. an image under one patch): HTTP 422."""


@dataclass
class Listing:
    """The sources of one split (one dict per file or item) and the problems found listing them."""

    sources: list[dict]
    problems: list[str] = field(default_factory=list)


def carve_gate_split(train: Listing, share: float) -> tuple[Listing, Listing]:
    """(train, gate): a `share` of train's groups (a source's "group", else its id: a UCF-101
    class's gXX clips, which share actors and scene, are never in both) held out from expert
    training, for training gates.

    A gate trained on the experts' own training inputs learns from losses the experts have
    memorised, not the losses they make on new inputs (measured on the demo's detection data:
    routing efficiency 0.07 trained on train vs 0.30 on held-out inputs a third as many). The
    paper trains both on one training set of a size where that matters less. Groups go to the
    gate split in the order of a hash of their name, so the carve is stable across reruns and
    machines; both sides keep at least one group when there are two.
    """
    if not 0 < share < 1:
        raise ValueError(f"gate_share={share}: must be between 0 and 1 (the share of train held out for gates)")
    group_of = lambda source: str(source.get("group", source["source_id"]))  # noqa: E731
    groups = sorted({group_of(s) for s in train.sources},
                    key=lambda g: hashlib.sha256(g.encode()).hexdigest())
    count = min(max(round(share * len(groups)), 1), len(groups) - 1) if len(groups) > 1 else 0
    held_out = set(groups[:count])
    kept = [s for s in train.sources if group_of(s) not in held_out]
    gate = [s for s in train.sources if group_of(s) in held_out]
    return Listing(sources=kept, problems=list(train.problems)), Listing(sources=gate)


@dataclass
class ServedInput:
    """One serving request decoded on the sensor side (serving/router.py).

    A request holds U routing units (superres: its 64x64 patches; detection or action: one image
    or clip); the gate routes each unit and only the chosen expert's P_n of it is sent.
    """

    gate: np.ndarray  # (U, ...) gate inputs in the stored gate-column format (task.gate_tensor)
    full_data_cost: float  # bytes (K per value) of sending every unit's full input
    full_wire_bytes: int  # bytes of the full input as decoded (uint8 values)
    context: Any = None  # whatever the task needs to make P_n and the response (stays on the sensor)


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
    settings: Any  # the profile's frozen settings (logged to MLflow); gate_share: see carve_gate_split

    # -- data ---------------------------------------------------------------------------
    def expert_names(self) -> list[str]: ...

    def data_costs(self) -> np.ndarray:
        """(N,) bytes of P_n(x) per input, K bytes per value."""

    def embedded_data(self, folder: Path, seed: int = 0) -> Path:
        """Write the embedded default data set in the task's real format (drawn with `seed`;
        a rerun with the same settings and seed keeps it); return its root."""

    def list_sources(self, data_root: Path | StoragePath, split: str) -> Listing:
        """One of SOURCE_SPLITS (prepare carves the gate split out of train: settings.gate_share).
        Each source: "source_id", "path" (str of the file: a URI for a remote one),
        "stamp" ([st_size, st_mtime_ns] from the listing) and the task's own keys."""

    # optional: label_options(data_root) -> dict[str, str], the label set a real data root
    # defines as task options (action: classes from classInd.txt; detection: the JSON's
    # categories); pipelines.runtime.label_options applies it whenever a data root is given.

    def load(self, source: dict) -> list[dict]:
        """Decode one source into sample rows: sample_id, group, gate, x<n>, enc<n>, targets, meta.

        Raises UnreadableInput for a file this node cannot read, BadInput for bad content.
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

    def gate_tensor(self, gate: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(M, C, H, W) float gate inputs from a batch of the stored gate column (numpy, or a
        tensor already on the trial's device: the result stays on that device)."""

    def heuristic(self, gate: np.ndarray) -> np.ndarray | None:
        """(M,) hand-made difficulty per input (higher: needs more data), or None."""

    # -- serving (optional: a task is servable by serving/ when it has all four) ----------
    def decode_request(self, body: bytes) -> ServedInput:
        """Raw request bytes (image or video file) -> the request's routing units.

        Raises BadInput (HTTP 400: not decodable, truncated) or InputTooSmall (HTTP 422).
        """

    def request_inputs(self, request: ServedInput, n: int, units: np.ndarray) -> np.ndarray:
        """(len(units), ...) numeric P_n of the given units: exactly what crosses to expert n."""

    def serve_expert(self, n: int, model: nn.Module, x: np.ndarray, device: torch.device) -> list[np.ndarray]:
        """Expert n on a batch of P_n inputs (B, ...): one numeric output array per input."""

    def response(self, request: ServedInput, outputs: list[np.ndarray], assignment: np.ndarray) -> dict:
        """The JSON prediction from every unit's expert output (outputs[u] came from expert assignment[u])."""


def with_options(base, overrides: dict, task: str):
    """`base` settings (a frozen dataclass) with `overrides` given as strings from the command
    line (`-o KEY=VALUE`) converted to each field's type: "4,3,2" for tuples of ints, "true"/"false"
    for flags. An unknown key or a bad value is a ValueError naming the option."""
    from dataclasses import fields, replace

    known = {f.name for f in fields(base)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(f"unknown {task} option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    typed = {}
    for key, value in overrides.items():
        current = getattr(base, key)
        try:
            if not isinstance(value, str):
                typed[key] = value
            elif isinstance(current, bool):
                if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                typed[key] = value.lower() in ("true", "1", "yes")
            elif isinstance(current, tuple):
                typed[key] = tuple(int(x) for x in value.split(","))
            else:
                typed[key] = type(current)(value)
        except ValueError:
            raise ValueError(f"{task} option {key}={value!r}: expected {type(current).__name__} "
                             f"like {current!r}") from None
        _check_amount(key, value, typed[key], getattr(base, "may_be_zero", ()), task)
    return replace(base, **typed)


def _check_amount(key: str, given, value, may_be_zero: tuple[str, ...], task: str) -> None:
    """Counts, sizes, rates and scales are positive and finite (zero only for the settings the
    task names in may_be_zero, e.g. "no embedded images"): `-o epochs=-3` is refused here."""
    import math

    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if not math.isfinite(v) or v < 0 or (v == 0 and key not in may_be_zero):
            need = "zero or more" if key in may_be_zero else "positive"
            raise ValueError(f"{task} option {key}={given!r}: must be {need}")
        if key == "gate_share" and v >= 1:  # a share of train's groups: some must stay for the experts
            raise ValueError(f"{task} option {key}={given!r}: must be below 1 (the share of train held out "
                             f"for training gates)")

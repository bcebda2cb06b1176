"""The task base class: everything the generic pipeline stages and serving need from a task.

The stages (pipelines/) and serving never branch on a task's name; they call TaskBase's methods.
A task is built from its frozen settings for a profile, and is pickled to Ray workers as it is.
tasks/README.md says how to add one.
"""

from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import pandas as pd
import torch
from torch import nn

from bmoe.gating import GateSpec

if TYPE_CHECKING:
    from storage import AnyPath

SOURCE_SPLITS = ("train", "val", "test")  # the splits a data set defines (task.list_sources)
GATE_SPLIT = "gate"  # carved out of train: inputs the experts never train on, for training gates
SPLITS = ("train", GATE_SPLIT, "val", "test")  # every split prepare writes
SCORED_SPLITS = (GATE_SPLIT, "val", "test")  # what cache scores: gates train, select and report on these; no
# stage reads the experts' scores on their own training inputs


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

    gate_input: np.ndarray  # (U, ...) the gate's inputs, as the stored "gate" column holds them (task.gate_tensor)
    full_data_cost: float  # bytes (K per value) of sending every unit's full input
    full_wire_bytes: int  # bytes of the full input as decoded (uint8 values)
    context: Any = None  # whatever the task needs to make P_n and the response (stays on the sensor)


@dataclass(frozen=True)
class ExpertTraining:
    """How one expert is trained with Ray Train (the recipe is logged with the expert)."""

    epochs: int
    batch_size: int
    lr: float
    optimizer: str = "adam"  # adam | sgd (SGD with momentum: torchvision's detection references)
    momentum: float = 0.9  # sgd only
    weight_decay: float = 0.0
    warmup_steps: int = 0  # the lr rises linearly from lr/1000 over the first steps (torchvision's warm-up)

    def __post_init__(self):
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer {self.optimizer!r}: expected one of {', '.join(OPTIMIZERS)}")


OPTIMIZERS = ("adam", "sgd")


class BadDataRoot(ValueError):
    """A data root a task cannot read as its data set (missing, empty, not its layout); the message
    says what was expected. TaskBase turns it into BadInput for the pipelines."""


class TaskBase(abc.ABC):
    """What every task implements: subclass it, fill in the abstract methods, and register a
    factory in tasks/__init__.py (tasks/README.md walks through it). The hooks are grouped by who
    calls them; the ones with a body are defaults a task may override.

    Shapes: M samples, N experts, U routing units of a served request. A sample row (load) holds
    "sample_id", "group", "gate" (the gate's input as stored), "x<n>" (P_n(x), what expert n
    sees), "enc<n>" (P_n encoded as it would cross a network), the target_columns and the
    meta_columns.

    The cache's column contract: evaluate(n, ...) returns per-sample columns, at least "loss" (the
    gate's training signal) and "score" (additive under the metric: what the oracle maximises);
    the cache stores each column c as "c_<n>" (loss_0, score_2, ...) beside the meta_columns, and
    metric(cache, assignment) reads "c_<n>" of the expert each sample was given.
    """

    name: ClassVar[str]  # the registry's key: --task NAME
    metric_name: ClassVar[str]  # e.g. "PSNR (dB, Y channel)"
    target_columns: ClassVar[tuple[str, ...]]  # the experts' targets, stored once in the gate shard
    gate_target: ClassVar[str | None] = None  # a target the gate input is (superres: "hr"), not stored twice
    meta_columns: ClassVar[tuple[str, ...]]  # scalar columns that travel with the gate shard into the cache
    train_columns: ClassVar[tuple[str, ...] | None] = None  # what experts train on; None: target_columns
    request_column: ClassVar[str] = "sample_id"  # rows sharing it arrive in one served request (superres: an image's patches)
    # inputs an expert scores at once in the cache stage: a scorer's memory is this many inputs'
    # activations, so it is set per task (a paper-size VGG16 SSD300 needs 50-70 MB per image, a
    # 160-frame motion clip 126 MB: 256 of them were 13-32 GB per actor, bench/scale.py)
    score_batch: ClassVar[int] = 256
    profiles: ClassVar[dict[str, Any]]  # smoke | demo | paper -> the task's frozen settings dataclass

    def __init__(self, settings):
        self.settings = settings  # logged to MLflow, hashed into the prepare's fingerprint
        self.check_settings()

    @classmethod
    def for_profile(cls, profile: str, **overrides) -> "TaskBase":
        """The task with a profile's settings, `overrides` (-o KEY=VALUE) applied and checked."""
        return cls(with_options(cls.profiles[profile], overrides, cls.name))

    def check_settings(self) -> None:
        """Raise ValueError for settings the task cannot run with (beyond with_options' checks)."""

    # -- data: prepare ------------------------------------------------------------------------
    @abc.abstractmethod
    def expert_names(self) -> list[str]:
        """N names, cheapest expert first."""

    @abc.abstractmethod
    def data_costs(self) -> np.ndarray:
        """(N,) bytes of P_n(x) per input, K bytes per value."""

    def embedded_data(self, folder: Path, seed: int = 0) -> Path:
        """The embedded default data set under `folder`, written once per embedded_key: a rerun
        with the same settings and seed keeps it. Returns the data root."""
        stamp = folder / "embedded.json"
        key = self.embedded_key(seed)
        if stamp.exists() and json.loads(stamp.read_text()) == key:
            return folder
        self.write_embedded(folder, seed)
        stamp.write_text(json.dumps(key))
        return folder

    @abc.abstractmethod
    def embedded_key(self, seed: int) -> dict:
        """What the embedded data depends on (settings, seed, a version): a change rewrites it."""

    @abc.abstractmethod
    def write_embedded(self, folder: Path, seed: int) -> None:
        """Write the embedded data set, drawn with `seed`, in the task's real format under `folder`."""

    def list_sources(self, data_root: AnyPath, split: str) -> Listing:
        """One of SOURCE_SPLITS (prepare carves the gate split out of train: settings.gate_share).
        Each source: "source_id", "path" (str of the file: a URI for a remote one), "stamp"
        ([st_size, st_mtime_ns] from the listing) and the task's own keys ("group": sources that
        must stay on one side of the gate split). BadInput names a data root that is not the task's."""
        try:
            return self.find_sources(data_root, split)
        except BadDataRoot as err:
            raise BadInput(str(err)) from None

    @abc.abstractmethod
    def find_sources(self, data_root: AnyPath, split: str) -> Listing:
        """list_sources' work; raise BadDataRoot for a root that is not the task's layout."""

    def label_options(self, data_root: AnyPath) -> dict[str, str]:
        """The label set a real data root defines, as task options (action: classes from
        classInd.txt; detection: the JSON's categories); none by default."""
        try:
            return self.read_labels(data_root)
        except BadDataRoot as err:
            raise BadInput(str(err)) from None

    def read_labels(self, data_root: AnyPath) -> dict[str, str]:
        return {}

    @abc.abstractmethod
    def load(self, source: dict) -> list[dict]:
        """Decode one source into sample rows (see the class docstring). Raises UnreadableInput
        for a file this node cannot read, BadInput for bad content."""

    # -- experts: train-experts, cache ---------------------------------------------------------
    @abc.abstractmethod
    def build_expert(self, n: int) -> nn.Module:
        """Expert n's architecture, untrained (its weights are loaded or trained afterwards)."""

    def check_pretrained(self) -> None:
        """Raise BadInput, in one line, if the pretrained parts initial_expert loads cannot be had
        (train-experts asks before any fit starts); nothing to check by default."""

    def initial_expert(self, n: int) -> nn.Module:
        """Expert n as its fit starts: build_expert's, or with pretrained parts loaded (detection's
        ImageNet backbones). Raises BadInput, in one line, for pretrained weights it cannot get."""
        return self.build_expert(n)

    def expert_training(self, n: int) -> ExpertTraining:
        """How expert n trains: by default every expert alike, from settings.epochs, batch_size, lr."""
        s = self.settings
        return ExpertTraining(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr)

    @abc.abstractmethod
    def train_loss(self, n: int, model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Expert n's scalar training loss on a batch of "x" and the train columns."""

    @abc.abstractmethod
    def evaluate(self, n: int, model: nn.Module, batch: dict[str, Any], device: torch.device) -> dict[str, np.ndarray]:
        """Per-sample cache columns of expert n on a batch: at least "loss" and "score" (the
        column contract in the class docstring)."""

    # -- mixture: sweep, report ------------------------------------------------------------------
    @abc.abstractmethod
    def metric(self, cache: pd.DataFrame, assignment: np.ndarray) -> dict[str, float]:
        """The task metric of a mixture whose sample i went to expert assignment[i] (M,):
        {"performance": the main metric, ...secondary metrics}."""

    @abc.abstractmethod
    def gate_spec(self) -> GateSpec:
        """The gate network's layout (the paper's Tables IV, VII, X)."""

    @abc.abstractmethod
    def gate_tensor(self, gate: np.ndarray | torch.Tensor) -> torch.Tensor:
        """(M, C, H, W) float gate inputs from a batch of the stored gate column (numpy, or a
        tensor already on the trial's device: the result stays on that device)."""

    def gate_steps(self) -> int:
        """Optimizer steps a sweep trains each gate for (settings.gate_steps; the paper trains
        detection's for 20k, action's for 80k); 0: the sweep grid's epochs."""
        return self.settings.gate_steps

    def heuristic(self, gate: np.ndarray) -> np.ndarray | None:
        """(M,) hand-made difficulty per input (higher: needs more data); None: the task has none."""
        return None

    def sample_weights(self, cache: pd.DataFrame) -> np.ndarray:
        """(M,) how much each sample's score counts in the metric (the oracle weighs by it)."""
        return np.ones(len(cache))

    def augment_gate(self, x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """A label-preserving augmentation of a training batch of gate inputs; none by default."""
        return x

    def draw_assignment(self, split, assignment: np.ndarray, path: Path) -> Path | None:
        """The report's picture of which inputs went to which expert (test split), or None."""
        return None

    # -- serving: serving/router.py and serving/experts.py -------------------------------------------
    @abc.abstractmethod
    def decode_request(self, body: bytes) -> ServedInput:
        """Raw request bytes (image or video file) -> the request's routing units. Raises
        BadInput (HTTP 400: not decodable, truncated) or InputTooSmall (HTTP 422)."""

    @abc.abstractmethod
    def request_inputs(self, request: ServedInput, n: int, units: np.ndarray) -> np.ndarray:
        """(len(units), ...) numeric P_n of the given units: exactly what crosses to expert n."""

    @abc.abstractmethod
    def serve_expert(self, n: int, model: nn.Module, x: np.ndarray, device: torch.device) -> list[np.ndarray]:
        """Expert n on a batch of P_n inputs (B, ...): one numeric output array per input."""

    @abc.abstractmethod
    def response(self, request: ServedInput, outputs: list[np.ndarray]) -> dict:
        """The JSON prediction from every unit's expert output (outputs[u]: unit u's)."""

    # -- replay: serving/replay.py ------------------------------------------------------------------
    @abc.abstractmethod
    def served_columns(self, rows: list[dict], response: dict, experts: np.ndarray) -> dict[str, np.ndarray]:
        """What evaluate gives, from a served response instead of the expert's output: per-row cache
        columns (at least those metric reads) of the expert each row went to. rows: load's rows of the
        source that was POSTed, one per routing unit, in the request's unit order; experts (U,): the
        expert the endpoint sent each unit to."""


def settings_record(settings) -> dict:
    """The settings as a root records them (identity, shard fingerprint): every field, except one
    the settings class lists in `added_later` while it holds its default. A setting added to bmoe
    after a root was made is, at its default, what the root was made with, so the root and its
    trained experts stay valid (no re-prepare, no retraining) after an upgrade."""
    from dataclasses import asdict, fields, is_dataclass

    if not is_dataclass(settings):
        return {"repr": repr(settings)}
    values = asdict(settings)
    for f in fields(settings):
        if f.name in getattr(settings, "added_later", ()) and getattr(settings, f.name) == f.default:
            del values[f.name]
    return values


def settings_repr(settings) -> str:
    """The dataclass's repr over settings_record's fields (what expert fingerprints hash)."""
    from dataclasses import fields, is_dataclass

    if not is_dataclass(settings):
        return repr(settings)
    kept = settings_record(settings)
    shown = ", ".join(f"{f.name}={getattr(settings, f.name)!r}" for f in fields(settings) if f.repr and f.name in kept)
    return f"{type(settings).__qualname__}({shown})"


def with_options(base, overrides: dict, task: str):
    """`base` settings (a frozen dataclass) with `overrides` given as strings from the command
    line (`-o KEY=VALUE`) converted to each field's type: "4,3,2" for tuples of ints, "true"/"false"
    for flags. An unknown key or a bad value is a ValueError naming the option."""
    from dataclasses import replace

    from tasks.typed_values import typed_fields

    typed = typed_fields(base, overrides, f"{task} option")
    for key, value in typed.items():
        _check_amount(key, overrides[key], value, getattr(base, "may_be_zero", ()), task)
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

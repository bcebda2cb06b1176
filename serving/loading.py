"""What a served mixture is made of, read from a pipeline run root (a local folder or an
object-store URI; paths from pipelines/layout.py) or the MLflow registry: the frozen experts,
the gate the sweep saved, and the gate's values on the validation inputs, on which the budget
controller calibrates.

The driver resolves the run into a ServedRun: references and a few numbers, checked to exist,
which is all that passes through .bind(). Every replica loads its own part from there
(load_gate in the router, load_expert in expert n), so no weights travel in the application's
config, and replicas on any node read the same root or registry.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from pipelines import registry
from pipelines.gate_inputs import GateInputs
from pipelines.integrity import expert_damage
from pipelines.manifest import read_manifest, shard_files
from pipelines.layout import RunLayout
from pipelines.methods import METHODS, SERVABLE
from pipelines.selection import validation_figure
from pipelines.runtime import RunConfig, UserError
from storage import AnyPath, as_path, load_torch, read_json
from tasks import TaskRef



@dataclass(frozen=True)
class ServedRun:
    """A served mixture by reference (picklable, a few hundred bytes)."""

    ref: TaskRef  # the task, its profile and -o options
    root: str
    tracking_uri: str
    expert_names: tuple[str, ...]
    d: tuple[float, ...]  # data cost per expert, bytes
    gate_file: str  # a path or URI under the root, or the registry URI it comes from
    gate_method: str
    expert_sources: tuple[str, ...]  # per expert: its checkpoint's path or URI, or a registry URI
    gate_target: float | None = None  # the d_target a registered gate was chosen for, if one

    @property
    def costs(self) -> np.ndarray:
        return np.asarray(self.d, dtype=np.float64)

    @property
    def task_name(self) -> str:
        return self.ref.name

    def task(self):
        return self.ref.task()


@dataclass
class ServedModels:
    """A ServedRun with every part loaded, for one process (the CLI's checks, benchmarks)."""

    run: ServedRun
    expert_states: list[dict]  # state_dict of each frozen expert
    gate_bundle: dict  # pipelines.gate_trial.gate_bundle: the gate's task, method, width, state_dict
    val_values: np.ndarray  # (M, N) gate values on the validation gate inputs

    @property
    def d(self) -> np.ndarray:
        return self.run.costs

    @property
    def gate_target(self) -> float | None:
        return self.run.gate_target

    def task(self):
        return self.run.task()


def reported_sweep(layout: RunLayout) -> dict:
    """The sweep record the task's report was made from (what the user has seen), else the latest;
    UserError if there is none."""
    summary = read_json(layout.reports() / "summary.json")
    sweep = read_json(layout.sweep_record(summary["sweep"])) if summary and summary.get("sweep") else None
    if sweep is None:
        latest = read_json(layout.latest_sweep())
        sweep = read_json(layout.resolve(latest["file"])) if latest else None
    if sweep is None:
        raise UserError(f"no sweep for task {layout.task_name} under {layout.root}: "
                        f"run `bmoe sweep --task {layout.task_name}` first")
    return sweep


def find_gate_file(layout: RunLayout, target: float | None = None) -> AnyPath:
    """The gate to serve at `target` (None: d_max / 2, the serving default), as the report picks:
    of every gate the sweep of the task's report (else its latest) trained (lagrange's for every budget, soft's and
    enforce's each for its own), the best on validation at the sweep's target nearest to it."""
    sweep = reported_sweep(layout)
    trials = [t for t in sweep["trials"] if t.get("gate_file") and t["config"]["method"] in SERVABLE]
    if not trials:
        raise UserError(f"sweep {sweep['name']} saved no trained gate (methods {', '.join(SERVABLE)}): "
                        "rerun `bmoe sweep` with one of them")
    return layout.resolve(best_gate(trials, target if target is not None else _default_target(layout))["gate_file"])


def best_gate(trials: list[dict], target: float) -> dict:
    """The trial whose gate is best on validation at the target (of the trials' points) nearest to
    `target`; a trial without points (older records) counts at its own d_target."""
    points = [(p, t) for t in trials for p in t.get("points") or [{**t, "d_target": t["config"].get("d_target")}]
              if p.get("d_target") is not None]
    if not points:
        return trials[0]
    nearest = min(abs(p["d_target"] - target) for p, _ in points)
    at_target = [(p, t) for p, t in points if abs(p["d_target"] - target) == nearest]
    figure = lambda pair: validation_figure(pair[0]) if validation_figure(pair[0]) is not None else -np.inf  # noqa: E731
    return max(at_target, key=figure)[1]  # the first among equals


def _default_target(layout: RunLayout) -> float:
    manifest = read_manifest(layout)
    if manifest is None:
        raise UserError(f"no prepared data for task {layout.task_name} under {layout.root}: run `bmoe prepare` first")
    return float(max(manifest["data_costs"])) / 2


def assigned_device(gpu_ids: Sequence, cuda_available: bool) -> "torch.device":
    """CUDA only where Ray assigned this process a GPU, else the CPU: CUDA being visible is not
    enough, since Ray 2.60 leaves CUDA_VISIBLE_DEVICES alone for an actor with num_gpus 0, and a
    replica that took a GPU anyway would share one Ray gave another. With a GPU assigned, Ray
    makes it the only visible one, so it is "cuda"."""
    import torch

    return torch.device("cuda" if len(gpu_ids) and cuda_available else "cpu")


def replica_device() -> "torch.device":
    """The device of the calling Serve replica (or Ray actor): assigned_device of its GPUs."""
    import warnings

    import ray
    import torch

    gpu_ids = ray.get_gpu_ids()
    device = assigned_device(gpu_ids, torch.cuda.is_available())
    if len(gpu_ids) and device.type == "cpu":  # the GPU stays idle: worth a line in the replica's log
        warnings.warn(f"Ray assigned GPU(s) {gpu_ids} but PyTorch sees no CUDA (a CPU-only build?): using the CPU")
    return device


def gate_values(gate, bundle: dict, x) -> np.ndarray:
    """(M, N) per-expert values the router trades against data cost: the scores a gate that
    predicts them gives (lagrange), log-probabilities of a gate that chooses (soft, enforce).
    x goes to the gate's device; the values come back to the CPU."""
    import torch

    with torch.no_grad():
        out = gate(x.to(next(gate.parameters()).device)).double().cpu()
    if METHODS[bundle["method"]].gate_output == "scores":
        return out.numpy() * bundle["score_std"] + bundle["score_mean"]
    return torch.log_softmax(out, dim=1).numpy()


def resolve_run(root: str, task_name: str, gate_file: str | None = None, target: float | None = None,
                expert_uris: list[str] | tuple[str, ...] | None = None,
                tracking_uri: str | None = None) -> ServedRun:
    """Find and check every part of a run; UserError names what is missing or damaged. Reads the
    gate file (kilobytes) and hashes the root's expert weights against their records (it never
    loads them: each replica does).

    gate_file: a path, or a registry URI (models:/bmoe-<task>-gate@best-d4096; pipelines/registry.py).
    expert_uris: registry or run URIs (models:/bmoe-<task>-expert-<n>/3, runs:/<id>/expert) to
    serve instead of the checkpoints under the root, one per expert, in expert order.
    """
    layout = RunConfig(task_name=task_name, root=str(root)).layout
    tracking = tracking_uri or RunConfig(task_name=task_name, root=str(root)).mlflow_uri
    gate_target = None
    if registry.is_model_uri(gate_file):
        location = gate_file
        gate_target = registry.chosen_target(gate_file, tracking)
    else:
        path = as_path(gate_file) if gate_file else find_gate_file(layout, target)
        if not path.exists():
            raise UserError(f"gate file {path} not found")
        location = str(path)
    bundle = _read_gate(location, tracking)[1]
    if bundle["task"] != task_name:
        raise UserError(f"gate file {location} is for task {bundle['task']}, not {task_name}")
    if bundle["method"] not in SERVABLE:
        raise UserError(f"gate file {location} holds a {bundle['method']} gate; "
                        f"servable: {', '.join(SERVABLE)}")
    task = RunConfig(task_name=task_name, root=str(root), profile=bundle["profile"], task_options=bundle["options"]).task()
    names = task.expert_names()
    if expert_uris:
        if len(expert_uris) != len(names):
            raise UserError(f"{len(expert_uris)} expert model URI(s) given; task {task_name} has {len(names)} experts "
                            f"({', '.join(names)})")
        sources = tuple(str(u) for u in expert_uris)
    else:
        sources = []
        for n, name in enumerate(names):
            weights = layout.weights(n)
            if not weights.exists():
                raise UserError(f"expert {n} ({name}) of task {task_name} has no checkpoint {weights}: "
                                "run `bmoe train-experts` first")
            if problem := expert_damage(layout, n, read_json(layout.expert_meta(n))):
                raise UserError(f"{problem}: run `bmoe train-experts` to train expert {n} ({name}) again")
            sources.append(str(weights))
        sources = tuple(sources)
    if read_manifest(layout) is None:
        raise UserError(f"no prepared data for task {task_name} under {layout.root}: run `bmoe prepare` first")
    return ServedRun(ref=TaskRef.from_dict(bundle), root=str(root),
                     tracking_uri=tracking, expert_names=tuple(names),
                     d=tuple(float(x) for x in task.data_costs()), gate_file=location,
                     gate_method=bundle["method"], expert_sources=sources, gate_target=gate_target)


def load_gate(run: ServedRun, device="cpu") -> tuple:
    """(gate, bundle, val_values): the gate in eval mode on `device`, its bundle (state_dict
    included, on the CPU) and its values (M, N) on the validation split's gate inputs: saved in
    the bundle by the sweep, else (older gates) computed from the shards in batches."""
    from pipelines.gate_trial import EVAL_BATCH

    gate, bundle = _read_gate(run.gate_file, run.tracking_uri)
    bundle["state_dict"] = {k: v.clone() for k, v in gate.state_dict().items()}
    gate = gate.to(device)
    if bundle.get("val_values") is not None:  # saved by the sweep: no pass over the split at start
        return gate, bundle, np.asarray(bundle["val_values"], dtype=np.float64)
    task = run.task()
    layout = RunConfig(task_name=run.task_name, root=run.root).layout
    val_gate = GateInputs(shard_files(layout, read_manifest(layout), "val", "gate"))
    values = np.concatenate([gate_values(gate, bundle, task.gate_tensor(x)) for _, x in val_gate.batches(EVAL_BATCH)])
    return gate, bundle, values


def load_expert(run: ServedRun, n: int):
    """Expert n built and loaded from its source (a model of the wrong task or size fails here,
    in one line), in eval mode on the CPU."""
    source = run.expert_sources[n]
    what = f"expert {n} ({run.expert_names[n]})"
    state = registry.load_weights(source, run.tracking_uri, what) if registry.is_model_uri(source) \
        else load_torch(as_path(source))
    model = run.task().build_expert(n)
    try:
        model.load_state_dict(state)
    except (RuntimeError, TypeError, AttributeError):
        raise UserError(f"model {source} is not {what} of task {run.task_name}: its weights do not fit") from None
    return model.eval()


def load_run(root: str, task_name: str, gate_file: str | None = None, target: float | None = None,
             expert_uris: list[str] | tuple[str, ...] | None = None, tracking_uri: str | None = None) -> ServedModels:
    """resolve_run, then every part loaded here: what the CLI checks before it deploys, and what
    benchmarks run in one process."""
    run = resolve_run(root, task_name, gate_file, target, expert_uris, tracking_uri)
    _, bundle, values = load_gate(run)
    return ServedModels(run=run, expert_states=[load_expert(run, n).state_dict() for n in range(len(run.expert_names))],
                        gate_bundle=bundle, val_values=values)


def _read_gate(location: str, tracking_uri: str) -> tuple:
    """The gate and bundle a gate file or registered gate holds; UserError if it holds anything else."""
    from pipelines.gate_trial import gate_from_bundle

    if registry.is_model_uri(location):
        raw = registry.load_weights(location, tracking_uri, "a gate")
    else:
        try:
            raw = load_torch(as_path(location))
        except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError for other files
            raise UserError(f"{location} is not a gate file saved by `bmoe sweep` ({type(err).__name__})") from None
    if not isinstance(raw, dict) or not {"task", "profile", "options", "width", "method", "state_dict"} <= set(raw):
        raise UserError(f"{location} is not a gate file saved by `bmoe sweep` (pipelines/gate_trial.py save_gate)")
    try:
        return gate_from_bundle(raw)
    except Exception as err:  # noqa: BLE001 - an unknown task, options or weights that do not fit
        raise UserError(f"{location}: a gate that does not fit its own task ({' '.join(str(err).split())[:200]})") from None

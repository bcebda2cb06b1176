"""What a served mixture is made of, read from a pipeline run root (a local folder or an
object-store URI; paths from pipelines/layout.py): the frozen experts, the gate the sweep saved,
and the gate's values on the validation inputs, on which the budget controller calibrates.

Everything is loaded once, where the app is built, and passed to the deployments as plain
tensors and arrays: replicas on other nodes need no access to the run root.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipelines import registry
from pipelines.gate_inputs import GateInputs
from pipelines.prepare import shard_files
from pipelines.layout import RunLayout
from pipelines.selection import best_on_validation, validation_figure
from pipelines.runtime import RunConfig, UserError
from storage import AnyPath, as_path, load_torch, read_json

SERVABLE_METHODS = ("lagrange", "enforce", "soft")  # gates that give every expert a value
HOOKS = ("decode_request", "request_inputs", "serve_expert", "response")


@dataclass
class ServedModels:
    """Everything the deployments need, as plain values (picklable to Ray)."""

    task: str
    profile: str
    options: dict
    expert_names: list[str]
    d: np.ndarray  # (N,) data cost per expert, bytes
    expert_states: list[dict]  # state_dict of each frozen expert
    gate: dict  # the gate bundle (pipelines.gate_trial.gate_bundle), state_dict included
    val_values: np.ndarray  # (M, N) gate values on the validation gate inputs
    gate_file: str  # a path, or the registry URI it came from
    gate_target: float | None = None  # the d_target a registered gate was chosen for, if one

    def task_obj(self):
        from tasks import get_task

        return get_task(self.task, self.profile, self.options)


def find_gate_file(layout: RunLayout, target: float | None = None) -> AnyPath:
    """The gate to serve from the task's latest sweep: the lagrange gate (one gate for every
    budget) if the sweep trained one, else the soft/enforce gate trained nearest the target
    (best validation performance among equals)."""
    latest = read_json(layout.latest_sweep())
    sweep = read_json(layout.resolve(latest["file"])) if latest else None
    if sweep is None:
        raise UserError(f"no sweep for task {layout.task} under {layout.root}: "
                        f"run `bmoe sweep --task {layout.task}` first")
    trials = [t for t in sweep["trials"] if t.get("gate_file") and t["config"]["method"] in SERVABLE_METHODS]
    if not trials:
        raise UserError(f"sweep {sweep['name']} saved no trained gate (methods {', '.join(SERVABLE_METHODS)}): "
                        "rerun `bmoe sweep` with one of them")
    lagrange = [t for t in trials if t["config"]["method"] == "lagrange"]
    if lagrange:  # the best of them on validation when the sweep searched its hyperparameters
        return layout.resolve(max(lagrange, key=lambda t: validation_figure(t) or -np.inf)["gate_file"])
    goal = target if target is not None else float(np.median([t["config"]["d_target"] for t in trials]))
    chosen = best_on_validation(trials, key=lambda t: (t["config"]["method"], t["config"]["d_target"]),
                                val=validation_figure)  # as the report picks them
    best = min(chosen.values(), key=lambda t: (abs(t["config"]["d_target"] - goal), -(validation_figure(t) or -np.inf)))
    return layout.resolve(best["gate_file"])


def gate_values(gate, bundle: dict, x) -> np.ndarray:
    """(M, N) per-expert values the router trades against data cost: predicted scores for the
    lagrange gate, log-probabilities for a soft/enforce gate."""
    import torch

    with torch.no_grad():
        out = gate(x)
    if bundle["method"] == "lagrange":
        return out.double().numpy() * bundle["score_std"] + bundle["score_mean"]
    return torch.log_softmax(out.double(), dim=1).numpy()


def load_run(root: str, task: str, gate_file: str | None = None, target: float | None = None,
             expert_uris: list[str] | tuple[str, ...] | None = None, tracking_uri: str | None = None) -> ServedModels:
    """Read a run's experts, gate and validation gate inputs; UserError names what is missing.

    gate_file: a path, or a registry URI (models:/bmoe-<task>-gate@best-d4096; pipelines/registry.py).
    expert_uris: registry or run URIs (models:/bmoe-<task>-expert-<n>/3, runs:/<id>/expert) to
    serve instead of the checkpoints under the root, one per expert, in expert order.
    """
    from pipelines.gate_trial import EVAL_BATCH

    layout = RunConfig(task=task, root=str(root)).layout
    tracking = tracking_uri or RunConfig(task=task, root=str(root)).mlflow_uri
    gate_target = None
    if registry.is_model_uri(gate_file):
        path = gate_file
        raw = registry.load_weights(gate_file, tracking, "a gate")
        gate_target = registry.chosen_target(gate_file, tracking)
    else:
        path = as_path(gate_file) if gate_file else find_gate_file(layout, target)
        if not path.exists():
            raise UserError(f"gate file {path} not found")
        try:
            raw = load_torch(path)
        except Exception as err:  # noqa: BLE001 - UnpicklingError, RuntimeError, EOFError for other files
            raise UserError(f"{path} is not a gate file saved by `bmoe sweep` ({type(err).__name__})") from None
    gate, bundle = _gate(raw, path)
    if bundle["task"] != task:
        raise UserError(f"gate file {path} is for task {bundle['task']}, not {task}")
    if bundle["method"] not in SERVABLE_METHODS:
        raise UserError(f"gate file {path} holds a {bundle['method']} gate; servable: {', '.join(SERVABLE_METHODS)}")
    cfg = RunConfig(task=task, root=str(root), profile=bundle["profile"], task_options=bundle["options"],
                    tracking_uri=tracking_uri)
    task_obj = cfg.task_obj()
    missing = [h for h in HOOKS if not callable(getattr(task_obj, h, None))]
    if missing:
        raise UserError(f"task {task} cannot be served yet: it lacks {', '.join(missing)} (see tasks/base.py)")
    if expert_uris:
        states = load_registered_experts(task_obj, list(expert_uris), tracking)
    else:
        states = []
        for n, name in enumerate(task_obj.expert_names()):
            weights = layout.weights(n)
            if not weights.exists():
                raise UserError(f"expert {n} ({name}) of task {task} has no checkpoint {weights}: "
                                "run `bmoe train-experts` first")
            states.append(load_torch(weights))
    manifest = read_json(layout.manifest())
    if manifest is None:
        raise UserError(f"no prepared data for task {task} under {layout.root}: run `bmoe prepare` first")
    # the validation split's gate values, streamed from its shards in batches (bounded memory)
    val_gate = GateInputs(shard_files(layout, manifest, "val", "gate"))
    values = np.concatenate([gate_values(gate, bundle, task_obj.gate_tensor(x))
                             for _, x in val_gate.batches(EVAL_BATCH)])
    bundle["state_dict"] = {k: v.clone() for k, v in gate.state_dict().items()}
    return ServedModels(task=task, profile=bundle["profile"], options=dict(bundle["options"]),
                        expert_names=task_obj.expert_names(), d=np.asarray(task_obj.data_costs(), dtype=np.float64),
                        expert_states=states, gate=bundle, val_values=values, gate_file=str(path),
                        gate_target=gate_target)


def _gate(raw, where) -> tuple:
    """The gate and bundle a loaded gate file holds; UserError if it holds anything else."""
    from pipelines.gate_trial import gate_from_bundle

    if not isinstance(raw, dict) or not {"task", "profile", "options", "width", "method", "state_dict"} <= set(raw):
        raise UserError(f"{where} is not a gate file saved by `bmoe sweep` (pipelines/gate_trial.py save_gate)")
    try:
        return gate_from_bundle(raw)
    except Exception as err:  # noqa: BLE001 - an unknown task, options or weights that do not fit
        raise UserError(f"{where}: a gate that does not fit its own task ({' '.join(str(err).split())[:200]})") from None


def load_registered_experts(task, uris: list[str], tracking_uri: str) -> list[dict]:
    """State dicts of the experts registered (or logged) in MLflow as plain weights, checked
    against the task's expert architectures so a model of the wrong task or size fails here, in
    one line."""
    names = task.expert_names()
    if len(uris) != len(names):
        raise UserError(f"{len(uris)} expert model URI(s) given; task {task.name} has {len(names)} experts "
                        f"({', '.join(names)})")
    states = []
    for n, uri in enumerate(uris):
        state = registry.load_weights(uri, tracking_uri, f"expert {n} ({names[n]})")
        try:
            task.build_expert(n).load_state_dict(state)
        except (RuntimeError, TypeError, AttributeError):
            raise UserError(f"model {uri} is not expert {n} ({names[n]}) of task {task.name}: "
                            "its weights do not fit") from None
        states.append(state)
    return states

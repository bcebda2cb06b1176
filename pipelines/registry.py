"""The MLflow Model Registry: each trained expert (`bmoe-<task>-expert-<n>`) and the report's best
gate per method and target (`bmoe-<task>-gate`, aliases `best-<method>-d<target>` and
`best-d<target>`), so serving can load `models:/bmoe-superres-gate@best-d4096`.

Versions hold plain weight files (one `*.pt`, read with torch.load(weights_only=True)), never a
pickled model: whoever can write to the tracking server cannot run code in serve.
"""

from __future__ import annotations

import re
import tempfile
from pathlib import Path

from pipelines.runtime import UserError

EXPERT_ARTIFACT = "expert"  # an expert's run: expert/weights.pt (its state_dict)
GATE_ARTIFACT = "gate"  # a trained trial's run: gate/<trial>.pt (pipelines.gate_trial.save_gate)
URI_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def expert_model(task: str, n: int) -> str:
    return f"bmoe-{task}-expert-{n}"


def gate_model(task: str) -> str:
    return f"bmoe-{task}-gate"


def gate_alias(d_target: float | None, method: str | None = None) -> str:
    """`best-d4096`, `best-enforce-d4096`, `best-lagrange` (aliases allow no dots: whole bytes)."""
    parts = ["best", *([method] if method else []), *([f"d{round(d_target)}"] if d_target is not None else [])]
    return "-".join(parts)


def is_model_uri(location: str | None) -> bool:
    return bool(location) and str(location).startswith(URI_SCHEMES)


def register(client, name: str, run_id: str, artifact: str, tags: dict[str, str] | None = None,
             aliases: tuple[str, ...] = ()):
    """A version of `name` made from the folder `artifact` of run `run_id`, once: registering the
    same run's folder again (a rerun report) only moves the aliases to it. Returns the version."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
    except MlflowException:
        client.create_registered_model(name, description="bmoe: plain weights, read with torch.load(weights_only=True)")
    source = f"{client.get_run(run_id).info.artifact_uri}/{artifact}"
    found = [v for v in client.search_model_versions(f"run_id = '{run_id}'") if v.name == name and v.source == source]
    version = found[0] if found else client.create_model_version(name, source, run_id=run_id, tags=tags or {})
    for alias in aliases:
        client.set_registered_model_alias(name, alias, version.version)
    return version


def chosen_target(uri: str, tracking_uri: str) -> float | None:
    """The d_target a registered gate was chosen for: from a best-...-d<bytes> alias, else the
    version's d_target tag; None for a gate of every target (lagrange) or a plain run URI."""
    alias = re.search(r"@(?:[A-Za-z0-9_-]*-)?d(\d+)$", uri)
    if alias:
        return float(alias.group(1))
    try:
        return float(version_tags(uri, tracking_uri).get("d_target", ""))
    except ValueError:
        return None


def version_tags(uri: str, tracking_uri: str) -> dict[str, str]:
    """The tags of the registered version a models:/name@alias or models:/name/N URI names ({} otherwise)."""
    import mlflow

    if not uri.startswith("models:/"):
        return {}
    name, _, ref = uri[len("models:/"):].partition("@")
    client = mlflow.MlflowClient(tracking_uri)
    try:
        if ref:
            return dict(client.get_model_version_by_alias(name, ref).tags)
        name, _, number = name.rpartition("/")
        return dict(client.get_model_version(name, number).tags) if number.isdigit() else {}
    except Exception as err:  # noqa: BLE001 - MlflowException for unknown names and aliases
        raise UserError(f"cannot find {uri} in the registry at {tracking_uri}: {_short(err)}") from None


def load_weights(uri: str, tracking_uri: str, what: str):
    """torch.load(weights_only=True) of the one `*.pt` file a registered version or run artifact
    folder holds; UserError (one line) for anything else, a pickled MLflow model included."""
    import mlflow

    from storage import as_path, load_torch

    mlflow.set_tracking_uri(tracking_uri)  # a version's mlflow-artifacts:/ source resolves through the server
    with tempfile.TemporaryDirectory(prefix="bmoe-registry-") as tmp:
        try:
            local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp, tracking_uri=tracking_uri))
        except Exception as err:  # noqa: BLE001 - MlflowException, OSError, botocore errors...
            raise UserError(f"cannot download {what} from {uri}: {_short(err)}") from None
        files = [local] if local.is_file() else sorted(local.rglob("*.pt"))
        if len(files) != 1 or files[0].suffix != ".pt":
            raise UserError(f"{uri} holds {len(files)} weight files (*.pt), not one: bmoe loads {what} only as the "
                            "plain weights it registers, never a pickled model")
        try:
            return load_torch(as_path(str(files[0])))
        except Exception as err:  # noqa: BLE001 - UnpicklingError for anything but tensors and plain values
            raise UserError(f"{uri}: {files[0].name} is not plain weights ({_short(err)}); refused") from None


def _short(err: Exception) -> str:
    return " ".join(str(err).split())[:200]

"""The run root's layout: every path under it, in one place.

    <root>/raw/<task>/                         the embedded data, written in the task's real format
    <root>/data/<task>/manifest.json           row counts, footer checksums, d_n, problems
    <root>/data/<task>/<split>/p<n>|gate/      Parquet shards (Ray Data writes them from the workers)
    <root>/experts/<task>/<n>/model.pt         frozen expert weights, expert.json beside them
    <root>/ray-train/                          Ray Train's storage_path: checkpoints, resumable fits
    <root>/cache/<task>/<split>.parquet        every expert's loss and score per sample, cache.json
    <root>/tune/<task>/<sweep>/                Ray Tune's storage_path: experiment state, restore
    <root>/sweeps/<task>/<sweep>.json          the sweep's record; latest.json names the newest
    <root>/sweeps/<task>/<sweep>/gates/        trained gates, one per trial (serving loads them)
    <root>/sweeps/<task>/<sweep>/assignments/  each trial's test assignment (the report's figures)
    <root>/reports/<task>/                     summary.json, report.md, PNG figures
    <root>/mlflow.db                           the default tracking database (local roots only)

The root is a local path or an object-store URI (storage.as_path); every stage, the report,
`bmoe compare` and serving ask this module for paths, and paths recorded inside the root
(sweep records, latest.json) are relative to it, so a copied or moved root still works.
"""

from __future__ import annotations

from dataclasses import dataclass

from storage import AnyPath, StoragePath, as_path


@dataclass(frozen=True)
class RunLayout:
    """The paths of one task's run under one root."""

    root: AnyPath
    task_name: str

    @classmethod
    def of(cls, root: str | AnyPath, task_name: str) -> "RunLayout":
        return cls(as_path(root), task_name)

    @property
    def is_remote(self) -> bool:
        return isinstance(self.root, StoragePath)

    def _under(self, kind: str) -> AnyPath:
        return self.root / kind / self.task_name

    # -- prepare -------------------------------------------------------------------------------
    def raw(self) -> AnyPath:
        return self._under("raw")

    def data(self) -> AnyPath:
        return self._under("data")

    def record_data_root(self, data_root: AnyPath) -> str:
        """How a manifest records the data root: relative for the root's own embedded data (a
        copied or moved root keeps reading its own copy), else as given."""
        return "raw/" + self.task_name if str(data_root) == str(self.raw()) else str(data_root)

    def data_root(self, manifest: dict) -> AnyPath:
        """The data root a manifest recorded (record_data_root), as a path."""
        recorded = manifest["data_root"]
        return self.raw() if recorded == "raw/" + self.task_name else as_path(recorded)

    def manifest(self) -> AnyPath:
        return self.data() / "manifest.json"

    def shards(self, split: str, part: str) -> AnyPath:
        """Folder of one shard set: part is 'p<n>' (expert n's input) or 'gate'."""
        return self.data() / split / part

    # -- train-experts ----------------------------------------------------------------------------
    def expert(self, n: int) -> AnyPath:
        return self._under("experts") / str(n)

    def weights(self, n: int) -> AnyPath:
        return self.expert(n) / "model.pt"

    def expert_meta(self, n: int) -> AnyPath:
        return self.expert(n) / "expert.json"

    def train_storage(self) -> str:
        """Ray Train's storage_path (a URI or a local folder)."""
        return str(self.root / "ray-train")

    # -- cache --------------------------------------------------------------------------------------
    def cache(self, split: str) -> AnyPath:
        return self._under("cache") / f"{split}.parquet"

    def cache_stamp(self) -> AnyPath:
        return self._under("cache") / "cache.json"

    # -- sweep ----------------------------------------------------------------------------------------
    def tune_storage(self) -> str:
        """Ray Tune's storage_path; each sweep is an experiment named after it below."""
        return str(self._under("tune"))

    def tune_experiment(self, sweep: str) -> str:
        return str(self._under("tune") / plain_name(sweep))

    def sweeps(self) -> AnyPath:
        return self._under("sweeps")

    def sweep_record(self, sweep: str) -> AnyPath:
        return self.sweeps() / f"{plain_name(sweep)}.json"

    def latest_sweep(self) -> AnyPath:
        return self.sweeps() / "latest.json"

    def gate_bundle(self, sweep: str, trial_id: str) -> AnyPath:
        return self.sweeps() / plain_name(sweep) / "gates" / f"{plain_name(trial_id)}.pt"

    def assignment(self, sweep: str, trial_id: str) -> AnyPath:
        return self.sweeps() / plain_name(sweep) / "assignments" / f"{plain_name(trial_id)}.npy"

    # -- report -----------------------------------------------------------------------------------------
    def reports(self) -> AnyPath:
        return self._under("reports")

    # -- tracking -----------------------------------------------------------------------------------------
    def mlflow_db(self) -> AnyPath:
        return self.root / "mlflow.db"

    def ray_temp(self) -> AnyPath:
        """A local Ray's session folder (local roots only; a cluster keeps its own)."""
        return self.root / "ray"

    # -- paths recorded inside the root ------------------------------------------------------------------
    def relative(self, path: AnyPath) -> str:
        """`path` relative to the root, as recorded in sweep records and latest.json."""
        return path.relative_to(self.root).as_posix()

    def resolve(self, recorded: str) -> AnyPath:
        """A recorded path back under this root (an absolute one from older runs: its tail)."""
        if "://" in recorded or recorded.startswith("/"):
            marker = f"/sweeps/{self.task_name}/"
            tail = recorded.split(marker, 1)[1] if marker in recorded else recorded.rsplit("/", 1)[-1]
            return self.sweeps() / tail
        parts = recorded.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"recorded path {recorded!r} is not a plain path inside the run root")
        return self.root / recorded


def plain_name(name: str) -> str:
    """A name that becomes one path component under the root (a sweep's, a trial's): refused
    when it could point elsewhere (separators, '.', '..', empty), as a ValueError naming it."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ValueError(f"name {name!r} cannot be a file name under the run root: use letters, digits, '-', '_'")
    return name

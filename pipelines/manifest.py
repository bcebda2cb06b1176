"""The manifest: what `prepare` recorded about a root's shards, read by every later stage.

<root>/data/<task>/manifest.json holds
    task, profile, seed-bearing identity     what the shards were made with (pipelines/identity.py)
    data_root, fingerprint, created          the inputs they were made from, and when
    experts, data_costs                      the ladder: expert names and d_n, cheapest first
    targets                                  each expert target's column in the gate set
                                             (pipelines/expert_rows.py); missing before targets
                                             were stored once
    label_options                            the label set the data root defined
    splits.<split>                           sources, samples, problems, unreadable,
                                             mean_encoded_bytes per P_n, and per shard set
                                             (p<n>, gate) its rows and files [{name, rows,
                                             bytes, sha256}] in row order
"""

from __future__ import annotations

from pipelines.identity import check_identity
from pipelines.runtime import RunConfig, UserError
from storage import AnyPath, read_json

__all__ = ["read_manifest", "require_manifest", "require_targets", "shard_files"]


def read_manifest(layout) -> dict | None:
    """The manifest of a RunLayout's task, or None when nothing was prepared."""
    return read_json(layout.manifest())


def require_manifest(cfg: RunConfig, stage: str = "bmoe") -> dict:
    """The manifest of the root's prepared data, checked against cfg's identity (UserError
    naming what differs, or that nothing was prepared)."""
    manifest = read_manifest(cfg.layout)
    if manifest is None:
        raise UserError(f"no prepared data for task {cfg.task_name} under {cfg.root}: run `bmoe prepare` first")
    check_identity(cfg, manifest, stage)
    return manifest


def require_targets(layout, manifest: dict) -> None:
    """UserError unless the manifest says where the targets are (an earlier bmoe's did not)."""
    if "targets" not in manifest:
        raise UserError(f"the shards under {layout.root} keep their targets in every P_n set (an earlier "
                        f"bmoe's layout): run `bmoe prepare` to store them once")


def shard_files(layout, manifest: dict, split: str, part: str) -> list[AnyPath]:
    """The files of one shard set in the manifest's order: the row order of the split that the
    cache keeps and that sweep trials stream in."""
    folder = layout.shards(split, part)
    return [folder / f["name"] for f in manifest["splits"][split]["shards"][part]["files"]]

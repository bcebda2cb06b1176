"""What the run root records about its files, checked before a stage trusts them.

Each file a stage writes for another to read has its size and SHA-256 recorded beside it: the
manifest for the shards (taken while they were written, pipelines/shard_writer.py), the cache
stamp for the cache, each expert's meta for its weights, the sweep record for its gates. A stage
that reads a file, or decides that what it made before can be kept, compares first: a damaged
file is named in one line, and the stage that made it makes it again. `bmoe verify` checks a
whole root.
"""

from __future__ import annotations

import hashlib

from storage import AnyPath, read_json

__all__ = ["digest", "damage", "shard_damage", "cache_damage", "expert_damage", "gate_damage", "verify_root"]

CHUNK = 1 << 20


def digest(path: AnyPath) -> dict:
    """{bytes, sha256} of a file, read in 1 MB pieces (local or in an object store)."""
    sha, size = hashlib.sha256(), 0
    with path.open("rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
            size += len(chunk)
    return {"bytes": size, "sha256": sha.hexdigest()}


def damage(path: AnyPath, recorded: dict | None, content: bool = True) -> str | None:
    """Why `path` is not the file recorded ({bytes, sha256}), or None when it is (or nothing was
    recorded: roots from before the records). content=False: presence and size only, for
    readers that check the SHA-256 as they fetch (pipelines/split_cache.py)."""
    if not recorded or "sha256" not in recorded:
        return None
    if not path.exists():
        return f"{path} is missing"
    size = path.stat().st_size
    if size != recorded["bytes"]:
        return f"{path} has {size} bytes where {recorded['bytes']} were written"
    if content and digest(path)["sha256"] != recorded["sha256"]:
        return f"{path} is damaged: its SHA-256 differs from the one recorded when it was written"
    return None


def shard_damage(layout, manifest: dict, splits=None, parts=None, content: bool = True) -> list[str]:
    """The manifest's shard files (of `splits` and `parts`, default all) that are not as prepare
    wrote them (content: see damage)."""
    problems = []
    for split, info in manifest.get("splits", {}).items():
        if splits is not None and split not in splits:
            continue
        for part, shard in info["shards"].items():
            if parts is not None and part not in parts:
                continue
            folder = layout.shards(split, part)
            for f in shard["files"]:
                problem = damage(folder / f["name"], f, content)
                if problem:
                    problems.append(problem)
    return problems


def cache_damage(layout, stamp: dict | None, content: bool = True) -> list[str]:
    """The cache files whose digests the cache stamp records and that differ (content: see damage)."""
    files = (stamp or {}).get("files", {})
    return [p for split, recorded in files.items() if (p := damage(layout.cache(split), recorded, content))]


def expert_damage(layout, n: int, meta: dict | None) -> str | None:
    """Expert n's weights against its meta's digest."""
    return damage(layout.weights(n), (meta or {}).get("weights_digest"))


def gate_damage(layout, trial: dict) -> str | None:
    """A sweep trial's saved gate against the digest its record holds."""
    rel = trial.get("gate_file")
    return damage(layout.resolve(rel), trial.get("gate_digest")) if rel else None


def verify_root(layout) -> tuple[list[str], int]:
    """Every recorded file of one task's run: (problems, files checked)."""
    problems, checked = [], 0
    manifest = read_json(layout.manifest())
    if manifest is None:
        return [f"no manifest at {layout.manifest()}: nothing prepared"], 0
    problems += shard_damage(layout, manifest)
    checked += sum(len(s["files"]) for info in manifest["splits"].values() for s in info["shards"].values())
    for n in range(len(manifest["experts"])):
        meta = read_json(layout.expert_meta(n))
        if meta is not None:
            checked += 1
            if problem := expert_damage(layout, n, meta):
                problems.append(problem)
    stamp = read_json(layout.cache_stamp())
    checked += len((stamp or {}).get("files", {}))
    problems += cache_damage(layout, stamp)
    latest = read_json(layout.latest_sweep())
    if latest is not None:
        sweep = read_json(layout.resolve(latest["file"])) or {}
        for trial in sweep.get("trials", []):
            if trial.get("gate_file"):
                checked += 1
                if problem := gate_damage(layout, trial):
                    problems.append(problem)
    return problems, checked

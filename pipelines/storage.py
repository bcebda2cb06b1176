"""Run roots in object storage: `--root s3://bucket/runs` (or gs://, file://, any pyarrow filesystem).

A stage works on a local working copy of the root and the object store is the run's durable
home: before a stage, files that changed in the store since this copy last saw them are pulled;
after it (also when it fails or is interrupted, so a sweep can resume elsewhere), files the
stage wrote or changed are pushed. Changes are told apart by size and mtime recorded at the
last sync, on each side, so an unchanged run costs one listing, not a transfer.

The working copy lives under $BMOE_WORKDIR (default ~/.cache/bmoe/roots), one folder per URI.
Ray workers read the working copy of the machine that runs the stage's driver: on a multi-node
cluster put $BMOE_WORKDIR on a mount every node sees, as for a plain path root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

SYNC_STATE = ".bmoe-sync.json"
# Regenerated where needed (the embedded data, Ray's own session files), never synced.
LOCAL_ONLY = ("raw", "ray", SYNC_STATE)


def is_uri(root: str) -> bool:
    return "://" in root


def working_copy(uri: str) -> Path:
    """The local folder that mirrors `uri` on this machine."""
    base = Path(os.environ.get("BMOE_WORKDIR") or Path.home() / ".cache" / "bmoe" / "roots").expanduser()
    tail = uri.rstrip("/").rsplit("/", 1)[-1] or "root"
    return (base / f"{tail}-{hashlib.sha256(uri.encode()).hexdigest()[:10]}").resolve()


class RemoteRoot:
    """Pull/push between one object-store root and its working copy."""

    def __init__(self, uri: str, local: Path):
        import pyarrow.fs as pafs

        try:
            self.fs, self.base = pafs.FileSystem.from_uri(uri)
        except (ValueError, OSError) as err:  # unknown scheme, missing credentials, bad bucket name
            from pipelines.runtime import UserError

            raise UserError(f"--root {uri}: {err}") from None
        self.uri, self.local = uri, local
        self.local.mkdir(parents=True, exist_ok=True)
        state = self.local / SYNC_STATE
        self.state: dict[str, dict] = json.loads(state.read_text()) if state.exists() else {}

    def pull(self) -> int:
        """Download what changed in the store since the last sync; returns the file count."""
        count = 0
        for rel, remote in self._remote_files().items():
            seen = self.state.get(rel, {})
            local = self.local / rel
            if local.exists() and seen.get("remote") == remote:
                continue
            local.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(f"{self.base}/{rel}") as src, open(local, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            self.state[rel] = {"remote": remote, "local": _stat(local)}
            count += 1
        self._save()
        return count

    def push(self) -> int:
        """Upload what the stage wrote or changed, and delete from the store what it deleted
        (prepare replaces its shards: stale ones must not come back); returns the file count."""
        count = 0
        for rel in [rel for rel in self.state if not (self.local / rel).exists()]:
            with contextlib.suppress(FileNotFoundError):
                self.fs.delete_file(f"{self.base}/{rel}")
            del self.state[rel]
            count += 1
        for local in sorted(p for p in self.local.rglob("*") if p.is_file()):
            rel = local.relative_to(self.local).as_posix()
            if rel.split("/", 1)[0] in LOCAL_ONLY or self.state.get(rel, {}).get("local") == _stat(local):
                continue
            target = f"{self.base}/{rel}"
            self.fs.create_dir(target.rsplit("/", 1)[0], recursive=True)
            with open(local, "rb") as src, self.fs.open_output_stream(target) as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
            info = self.fs.get_file_info(target)
            self.state[rel] = {"remote": [info.size, info.mtime_ns], "local": _stat(local)}
            count += 1
        self._save()
        return count

    def _remote_files(self) -> dict[str, list]:
        import pyarrow.fs as pafs

        if self.fs.get_file_info(self.base).type == pafs.FileType.NotFound:
            return {}
        infos = self.fs.get_file_info(pafs.FileSelector(self.base, recursive=True))
        prefix = self.base.rstrip("/") + "/"
        return {i.path[len(prefix):]: [i.size, i.mtime_ns] for i in infos
                if i.type == pafs.FileType.File and i.path[len(prefix):].split("/", 1)[0] not in LOCAL_ONLY}

    def _save(self) -> None:
        (self.local / SYNC_STATE).write_text(json.dumps(self.state))


def _stat(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns]


@contextlib.contextmanager
def synced(cfg):
    """Around one or more stages: pull before, push after (whatever happened). A plain path
    root needs neither, so this is a no-op for it."""
    if not is_uri(cfg.root):
        yield
        return
    remote = RemoteRoot(cfg.root, cfg.root_path)
    pulled = remote.pull()
    if pulled:
        print(f"storage: {pulled} files from {cfg.root} into the working copy {cfg.root_path}")
    try:
        yield
    finally:
        pushed = remote.push()
        print(f"storage: {pushed} new or changed files pushed to {cfg.root}")

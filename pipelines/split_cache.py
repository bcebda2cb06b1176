"""A node's own copy of the split files its sweep trials read, fetched once from an object store.

A trial trains for many epochs and reads its gate, val and test splits in every one. On a local
root (or a mount) the files are memory-mapped in place and the OS page cache keeps them; on an
object-store root (s3://...) every epoch would fetch the whole split again. So a trial first asks
this cache for each file by the size and SHA-256 the run root recorded when it was written (the
manifest for shards, the cache stamp for the expert cache): a file is fetched at most once per
node, checked against its record as it arrives, and shared by every trial on the node. The key is
the content's checksum, so a new prepare or cache (other bytes) can never be served a stale copy;
a damaged download is refused, never cached.

Concurrent trials on one node take a per-entry file lock: one fetches, the others wait and then
read its copy. Entries over the size bound are evicted least recently used first (an open or
memory-mapped copy stays readable after its name is removed).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import tempfile
from pathlib import Path

from storage import AnyPath, StoragePath

CACHE_ENV = "BMOE_SPLIT_CACHE"  # the folder (default: <tmp>/bmoe-split-cache, on the node's own disk)
LIMIT_ENV = "BMOE_SPLIT_CACHE_GB"  # the most it keeps (default: half the folder's disk)
CHUNK = 8 << 20


class DamagedDownload(ValueError):
    """A file in the object store is not the file the run root recorded."""


def cache_folder() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path(tempfile.gettempdir()) / "bmoe-split-cache")


def node_local(path: AnyPath, recorded: dict | None, folder: Path | None = None) -> AnyPath:
    """A path to read `path`'s content from on this node: the path itself when it is local or
    nothing was recorded about it (roots from before the records), else the node's checked copy.

    Args:
        recorded: {bytes, sha256} as the root recorded the file when it was written.
    """
    if not isinstance(path, StoragePath) or not recorded or "sha256" not in recorded:
        return path
    folder = folder or cache_folder()
    folder.mkdir(parents=True, exist_ok=True)
    entry = folder / f"{recorded['sha256']}{path.suffix}"
    with _locked(folder / f"{recorded['sha256']}.lock"):
        if entry.exists() and entry.stat().st_size == recorded["bytes"]:
            os.utime(entry)  # most recently used
            return entry
        _evict(folder, keep=int(recorded["bytes"]))
        _fetch(path, recorded, entry)
    return entry


def node_local_files(paths: list[AnyPath], recorded: list[dict | None], folder: Path | None = None) -> list[AnyPath]:
    """node_local of each path with its record, in order."""
    if len(paths) != len(recorded):
        raise ValueError(f"{len(paths)} files but {len(recorded)} records")
    return [node_local(p, r, folder) for p, r in zip(paths, recorded)]


def _fetch(path: StoragePath, recorded: dict, entry: Path) -> None:
    """Download to a temporary name beside the entry, checking size and SHA-256 on the way;
    the entry appears (atomically) only when the whole file is the recorded one."""
    sha, size = hashlib.sha256(), 0
    fd, tmp = tempfile.mkstemp(dir=entry.parent, prefix=".fetch-")
    try:
        with path.open("rb") as src, os.fdopen(fd, "wb") as dst:
            while chunk := src.read(CHUNK):
                sha.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        if size != recorded["bytes"] or sha.hexdigest() != recorded["sha256"]:
            raise DamagedDownload(f"{path} is damaged: {size} bytes with another SHA-256 than the "
                                  f"{recorded['bytes']} recorded when it was written")
        os.replace(tmp, entry)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _limit(folder: Path) -> int:
    if os.environ.get(LIMIT_ENV):
        return int(float(os.environ[LIMIT_ENV]) * (1 << 30))
    usage = os.statvfs(folder)
    return usage.f_blocks * usage.f_frsize // 2


def _evict(folder: Path, keep: int) -> None:
    """Remove least recently used entries until `keep` more bytes fit under the bound."""
    entries = sorted((p for p in folder.iterdir() if not p.name.startswith(".") and p.suffix != ".lock"),
                     key=lambda p: p.stat().st_mtime)
    total = sum(p.stat().st_size for p in entries)
    bound = _limit(folder)
    for old in entries:
        if total + keep <= bound:
            break
        total -= old.stat().st_size
        with contextlib.suppress(FileNotFoundError):
            old.unlink()


@contextlib.contextmanager
def _locked(lock: Path):
    with open(lock, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)

"""Reading a task's input files through their path objects, wherever they live.

A data root is a local `pathlib.Path` or a `storage.StoragePath` (an object-store URI), and the
files below it are loaded on whichever Ray node runs the work, which may share no disk with the
driver that listed them. So readers never re-wrap a path in `Path(...)` nor hand a file name to a
decoder: they read the bytes here first (a failure to read is UnreadableInput, naming the node),
then decode those bytes (a failure to decode stays a plain BadInput).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

from storage import AnyPath, StoragePath, as_path
from tasks.base import UnreadableInput

__all__ = ["file_stamp", "files_in", "input_path", "read_input", "unreadable"]


def input_path(path: str | os.PathLike | StoragePath) -> AnyPath:
    """A path object for a source's "path" (or a data root): a Path or StoragePath as given, text
    through storage.as_path. UnreadableInput when the text is no usable URI here."""
    if isinstance(path, (Path, StoragePath)):
        return path
    try:
        return as_path(path)
    except ValueError as err:
        raise unreadable(path, err) from None


def unreadable(path: AnyPath | str, err: BaseException) -> UnreadableInput:
    """The one-line UnreadableInput for `path`, which this node failed to read with `err`."""
    detail = getattr(err, "strerror", None) or str(err)
    reason = f"{type(err).__name__}: {' '.join(str(detail).split())}" if detail else type(err).__name__
    return UnreadableInput(f"{path}: cannot be read on node {socket.gethostname()} ({reason})")


def read_input(path: AnyPath) -> bytes:
    """Every byte of one input file, read through its path object; UnreadableInput when it cannot
    be read here (not found, no permission, a directory, any OSError of the storage layer, or a
    store this node cannot reach: StoragePath makes its filesystem on first use, ValueError)."""
    try:
        return path.read_bytes()
    except (OSError, ValueError) as err:  # FileNotFoundError, PermissionError, pyarrow's OSError ...
        raise unreadable(path, err) from None


def file_stamp(path: AnyPath) -> list[int] | None:
    """[st_size, st_mtime_ns] of a listed file, for fingerprinting inputs: free for a StoragePath
    child of a listing (the listing said), one stat for a local file. An unknown mtime (a store that
    gives none) is 0; None when the file vanished since it was listed (its load will say so)."""
    try:
        stat = path.stat()
    except OSError:
        return None
    return [int(stat.st_size), int(stat.st_mtime_ns or 0)]


def files_in(folder: AnyPath) -> dict[str, AnyPath]:
    """{name: path} of the files directly in `folder`, from one listing ({} when it is no folder):
    membership in it replaces an is_file() per name, which is one request each on an object store."""
    try:
        return {p.name: p for p in folder.iterdir() if p.is_file()}
    except (FileNotFoundError, NotADirectoryError):
        return {}

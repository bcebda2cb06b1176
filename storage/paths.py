"""One path type for local folders and object stores.

A run root or a data root is either a local path (one machine, or a mount every node sees) or
a URI such as s3://bucket/runs that pyarrow resolves to a filesystem (credentials and endpoint
from the usual environment: AWS_ACCESS_KEY_ID, AWS_ENDPOINT_URL, GOOGLE_APPLICATION_CREDENTIALS).
`as_path` gives a `pathlib.Path` for the first and a `StoragePath` for the second; both offer
the small part of pathlib the pipeline uses (`/`, name, exists, is_dir, iterdir, read_bytes,
open ...), so readers and stages take either and work the same on every node. A StoragePath
pickles as its URI and finds its filesystem again wherever it is unpickled.
"""

from __future__ import annotations

import contextlib
import fnmatch
import io
import json
import os
import shutil
import tempfile
import urllib.parse
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Union


class Stat(NamedTuple):
    st_size: int
    st_mtime_ns: int | None


_FILESYSTEMS: dict[str, Any] = {}  # "scheme://bucket" -> pyarrow filesystem, one client per process


def is_uri(text: str | os.PathLike) -> bool:
    """True for an object-store URI (s3://, gs://, ...); file:// and plain paths are local."""
    return isinstance(text, StoragePath) or ("://" in str(text) and not str(text).startswith("file://"))


def as_path(text: "str | os.PathLike | StoragePath") -> "AnyPath":
    """A local absolute Path, or a StoragePath for an object-store URI. ValueError (one line)
    for a URI pyarrow cannot resolve: unknown scheme, no bucket, no credentials."""
    if isinstance(text, (StoragePath, Path)):
        return text if isinstance(text, StoragePath) else text.expanduser().resolve()
    text = str(text)
    if text.startswith("file://"):
        return Path(urllib.parse.unquote(urllib.parse.urlparse(text).path)).resolve()
    if "://" in text:
        return StoragePath(text)
    return Path(text).expanduser().resolve()


class StoragePath:
    """A file or folder in an object store, with pathlib's names for what the pipeline needs."""

    __slots__ = ("scheme", "key", "_info")

    def __init__(self, uri: str, _info=None):
        scheme, sep, rest = uri.partition("://")
        if not sep or not scheme:
            raise ValueError(f"{uri}: not a URI (expected scheme://bucket/path)")
        rest = rest.strip("/")
        bucket = rest.split("/", 1)[0]
        if not bucket:
            raise ValueError(f"{uri}: no bucket in the URI (expected {scheme}://bucket/path)")
        if any(part in ("..", ".") for part in rest.split("/")):
            raise ValueError(f"{uri}: '.' and '..' are not allowed in an object-store path")
        self.scheme, self.key, self._info = scheme, rest, _info

    # -- identity ----------------------------------------------------------------------------
    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.key}"

    @property
    def filesystem(self):
        """The pyarrow filesystem (one per scheme and bucket in this process), made on first use:
        a bad scheme, bucket or credentials raise ValueError here, in one line."""
        import pyarrow.fs as pafs

        bucket = self.key.split("/", 1)[0]
        name = f"{self.scheme}://{bucket}"
        if name not in _FILESYSTEMS:
            try:
                _FILESYSTEMS[name] = pafs.FileSystem.from_uri(name)[0]
            except (ValueError, OSError) as err:  # unknown scheme, bad bucket name, no credentials
                raise ValueError(f"{self.uri}: {' '.join(str(err).split())}") from None
        return _FILESYSTEMS[name]

    def __str__(self) -> str:
        return self.uri

    def __repr__(self) -> str:
        return f"StoragePath({self.uri!r})"

    def __reduce__(self):
        return StoragePath, (self.uri,)

    def __eq__(self, other) -> bool:
        return isinstance(other, StoragePath) and other.uri == self.uri

    def __lt__(self, other: "StoragePath") -> bool:
        return self.uri < other.uri

    def __hash__(self) -> int:
        return hash(self.uri)

    def __truediv__(self, part: str | os.PathLike) -> "StoragePath":
        part = str(part).strip("/")
        return StoragePath(f"{self.uri}/{part}") if part else self

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def suffix(self) -> str:
        return Path(self.name).suffix

    @property
    def stem(self) -> str:
        return Path(self.name).stem

    @property
    def parent(self) -> "StoragePath":
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return StoragePath(f"{self.scheme}://{head}")

    def relative_to(self, other: "StoragePath") -> Path:
        prefix = other.key.rstrip("/") + "/"
        if not self.key.startswith(prefix):
            raise ValueError(f"{self.uri} is not under {other.uri}")
        return Path(self.key[len(prefix):])

    def as_uri(self) -> str:
        return self.uri

    # -- queries -----------------------------------------------------------------------------
    def _file_info(self):
        # a child from a listing keeps what the listing said; any other path asks the store
        return self._info if self._info is not None else self.filesystem.get_file_info(self.key)

    def _kind(self):
        import pyarrow.fs as pafs

        return self._file_info().type, pafs.FileType

    def exists(self) -> bool:
        kind, types = self._kind()
        return kind != types.NotFound

    def is_file(self) -> bool:
        kind, types = self._kind()
        return kind == types.File

    def is_dir(self) -> bool:
        kind, types = self._kind()
        return kind == types.Directory

    def stat(self) -> Stat:
        info = self._file_info()
        if not self.exists():
            raise FileNotFoundError(self.uri)
        return Stat(info.size or 0, info.mtime_ns)

    def iterdir(self) -> Iterator["StoragePath"]:
        """The folder's entries (one listing call; each child keeps its size and type)."""
        yield from self._listing(recursive=False)

    def glob(self, pattern: str) -> Iterator["StoragePath"]:
        """Entries directly in this folder whose name matches `pattern` (no '**')."""
        return (p for p in self.iterdir() if fnmatch.fnmatch(p.name, pattern))

    def files(self) -> Iterator["StoragePath"]:
        """Every file below this folder, at any depth."""
        return (p for p in self._listing(recursive=True) if p.is_file())

    def _listing(self, recursive: bool) -> Iterator["StoragePath"]:
        import pyarrow.fs as pafs

        selector = pafs.FileSelector(self.key, recursive=recursive)
        for info in sorted(self.filesystem.get_file_info(selector), key=lambda i: i.path):
            yield StoragePath(f"{self.scheme}://{info.path}", _info=info)

    # -- reading and writing -----------------------------------------------------------------
    def open(self, mode: str = "rb"):
        if mode == "rb":
            return self.filesystem.open_input_file(self.key)
        if mode == "wb":
            self._info = None
            return self.filesystem.open_output_stream(self.key)
        raise ValueError(f"StoragePath.open supports 'rb' and 'wb', not {mode!r}")

    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.key) as f:  # one GET (open_input_file adds a HEAD)
            return f.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        with self.open("wb") as f:
            f.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = True, exist_ok: bool = True) -> None:
        """Nothing to do: object stores have no folders, only keys with slashes."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.filesystem.delete_file(self.key)
        except FileNotFoundError:
            if not missing_ok:
                raise
        self._info = None


AnyPath = Union[Path, StoragePath]


# -- helpers that take either kind of path ---------------------------------------------------
def write_bytes(path: AnyPath, data: bytes) -> None:
    """Write a whole file; a local one appears complete or not at all (temp file + rename)."""
    if isinstance(path, StoragePath):
        path.write_bytes(data)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def copy_file(local: Path, dest: AnyPath) -> None:
    """A local file to `dest`, streamed in 4 MB pieces (never whole in memory); a local dest
    appears complete or not at all."""
    if isinstance(dest, StoragePath):
        with open(local, "rb") as src, dest.open("wb") as out:
            while chunk := src.read(1 << 22):
                out.write(chunk)
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    os.close(fd)
    shutil.copyfile(local, tmp)
    os.replace(tmp, dest)


def write_text(path: AnyPath, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: AnyPath, value) -> None:
    write_text(path, json.dumps(value, indent=2))


def read_json(path: AnyPath, default=None):
    """The JSON at `path`, or `default` when there is no such file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return default


def remove_tree(path: AnyPath) -> None:
    """Delete a folder and everything below it (nothing when it does not exist)."""
    if isinstance(path, StoragePath):
        if path.exists():
            path.filesystem.delete_dir(path.key)
        return
    if path.exists():
        shutil.rmtree(path)


def upload_tree(local: Path, dest: AnyPath) -> int:
    """Copy every file below the local folder to the same relative place under `dest`."""
    count = 0
    for file in sorted(p for p in Path(local).rglob("*") if p.is_file()):
        rel = file.relative_to(local).as_posix()
        if isinstance(dest, StoragePath):
            (dest / rel).write_bytes(file.read_bytes())
        else:
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, dest / rel)
        count += 1
    return count


@contextlib.contextmanager
def local_copy(path: AnyPath) -> Iterator[Path]:
    """A local file with the content of `path`, for decoders that only open file names
    (decord, pycocotools): the path itself when local, else a temporary copy, deleted after."""
    if not isinstance(path, StoragePath):
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="bmoe-copy-") as tmp:
        local = Path(tmp) / path.name
        with path.open("rb") as src, open(local, "wb") as dst:
            while chunk := src.read(1 << 22):
                dst.write(chunk)
        yield local


PICKLED = "ray.data.arrow_pickled_object"  # Ray's Arrow type for pickled Python objects


class UnsafeFile(ValueError):
    """A file whose content could run code when read (a column of pickled Python objects)."""


def refuse_pickled(schema, where: AnyPath | str) -> None:
    """UnsafeFile when any column of `schema` is, or nests, Ray's pickled-object type (known to
    pyarrow as the type, or as the extension name in the field's metadata when Ray's types are
    not registered). Reading such a column unpickles it: whoever can write the file runs code."""
    import pyarrow as pa

    def pickled(dtype) -> bool:
        if isinstance(dtype, pa.ExtensionType):
            return dtype.extension_name == PICKLED or pickled(dtype.storage_type)
        if pa.types.is_dictionary(dtype):
            return pickled(dtype.value_type)
        return any(pickled(dtype.field(i).type) for i in range(dtype.num_fields))

    for field in schema:
        named = (field.metadata or {}).get(b"ARROW:extension:name") == PICKLED.encode()
        if named or pickled(field.type):
            raise UnsafeFile(f"{where}: column {field.name!r} holds pickled Python objects, which would run "
                             "code when read: refusing the file (the pipeline never writes such columns)")


def read_table(path: AnyPath, columns: list[str] | None = None):
    """A Parquet file, or a folder of them, as one pyarrow Table; UnsafeFile if a column holds
    pickled objects (checked on the table read, before anything converts it)."""
    import pyarrow.parquet as pq

    if isinstance(path, StoragePath):
        table = pq.read_table(path.key, columns=columns, filesystem=path.filesystem)
    else:
        table = pq.read_table(str(path), columns=columns)
    refuse_pickled(table.schema, path)
    return table


def write_table(table, path: AnyPath) -> None:
    """One Parquet file from a pyarrow Table or a pandas DataFrame (index dropped)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    if not isinstance(table, pa.Table):
        table = pa.Table.from_pandas(table, preserve_index=False)
    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_bytes(path, buffer.getvalue())


def save_torch(obj, path: AnyPath) -> None:
    """torch.save to any path (tensors and plain values only: read back with weights_only)."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes(path, buffer.getvalue())


def load_torch(path: AnyPath, map_location="cpu"):
    """torch.load(weights_only=True) from any path: tensors and plain values, never code."""
    import torch

    return torch.load(io.BytesIO(path.read_bytes()), map_location=map_location, weights_only=True)

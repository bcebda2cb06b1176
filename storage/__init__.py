"""Files and folders wherever they live: a local path or an object-store URI (s3://, gs://, any
pyarrow filesystem), read and written the same way from whichever Ray node does the work."""

from storage.paths import (
    AnyPath,
    StoragePath,
    UnsafeFile,
    as_path,
    copy_file,
    is_uri,
    load_torch,
    local_copy,
    read_json,
    read_table,
    refuse_pickled,
    remove_tree,
    save_torch,
    upload_tree,
    write_bytes,
    write_json,
    write_table,
    write_text,
)

__all__ = [
    "AnyPath",
    "StoragePath",
    "UnsafeFile",
    "as_path",
    "copy_file",
    "is_uri",
    "load_torch",
    "local_copy",
    "read_json",
    "read_table",
    "refuse_pickled",
    "remove_tree",
    "save_torch",
    "upload_tree",
    "write_bytes",
    "write_json",
    "write_table",
    "write_text",
]

"""Atomic file writes: a reader never sees a half-written output, a crash leaves the old one."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    Works for files and directories. A directory target is swapped via a backup rename
    (``.NAME.old``): the old directory is removed only once the new one is in place, and if the
    second rename fails the backup is renamed back. A backup left by a crash between the two renames
    is restored on the next call, so the last complete directory is never lost.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    backup = path.with_name(f".{path.name}.old")
    if backup.is_dir():  # a crash between the two renames: the backup is the last complete output
        if path.exists():
            shutil.rmtree(backup, ignore_errors=True)
        else:
            backup.rename(path)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()
    try:
        yield tmp
        if tmp.is_dir() and path.exists():
            path.rename(backup)
            try:
                tmp.rename(path)
            except OSError:
                backup.rename(path)
                raise
            shutil.rmtree(backup, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()


def write_error_reason(e: Exception) -> str:
    """The one-line reason a write failed: the OS's message (e.g. "No space left on device"), else the error's first line.

    safetensors reports its own I/O errors as ``SafetensorError("... I/O error: <reason> (os error 28) ...")``;
    the reason is taken out of that text so every writer says the same thing for the same cause.
    """
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    found = re.search(r"I/O error: (.+?) \(os error \d+\)", str(e))
    return found.group(1) if found else (str(e).splitlines()[0] if str(e) else type(e).__name__)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """JSON with sorted keys and a trailing newline, so diffs and DVC hashes are stable."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n")


def write_parquet_atomic(df, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """Write a polars DataFrame as parquet atomically, optionally with key/value file metadata."""
    import pyarrow.parquet as pq

    table = df.to_arrow()
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    with atomic_path(path) as tmp:
        pq.write_table(table, tmp)


def read_parquet_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The key/value metadata written by :func:`write_parquet_atomic` (pandas/arrow keys left out)."""
    import pyarrow.parquet as pq

    meta = pq.read_schema(path).metadata or {}
    return {k.decode(): v.decode() for k, v in meta.items() if not k.startswith(b"pandas") and k != b"ARROW:schema"}

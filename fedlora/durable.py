"""Durable file writes: the one copy that checkpoints, run outputs and the nodes' privacy ledgers use.

- :func:`write_durably`: write and fsync a file (not atomic by itself).
- :func:`fsync_dir`: fsync a directory, so names created, renamed or removed in it are on disk.
- :func:`replace_durably`: atomic and durable replacement of a file: temporary file in the same directory,
  fsync, ``os.replace``, fsync of the directory. A reader sees the old content or the new, never a mix,
  also after a power loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path


def write_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` (created with ``mode`` or truncated), flushed and fsync'ed before returning.

    Not atomic by itself: callers write into a directory no reader trusts yet, or to a temporary name
    they then ``os.replace`` (:func:`replace_durably`)."""
    with Path(path).open("wb") as fh:
        os.fchmod(fh.fileno(), mode)
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())


def fsync_dir(path: Path) -> None:
    """fsync a directory, so that the names created, renamed or removed in it are on disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def replace_durably(path: Path, data: bytes, mode: int = 0o644) -> None:
    """Atomically replace ``path`` by ``data`` (temp file, fsync, ``os.replace``, fsync of the directory).

    On failure the previous file is unchanged and the temporary file is removed; the ``OSError`` propagates."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write_durably(tmp, data, mode)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of ``data`` (manifest checksums)."""
    return hashlib.sha256(data).hexdigest()

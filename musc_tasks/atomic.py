"""Atomic file writes: readers see the old content or the new, never a part, even after a crash."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

__all__ = ["write_atomic"]

# An empty directory removed by another writer between our mkdir and our open is retried.
_OPEN_ATTEMPTS = 3


def write_atomic(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write ``data`` to ``path`` through a hidden temp file, ``os.replace`` and fsyncs.

    The temp file in the same directory is fsynced, renamed onto ``path``, and then the
    directory is fsynced so the rename itself survives a power loss.

    Parameters
    ----------
    path : path-like
        Final location; parent directories are created.
    data : bytes or str
        str is written as UTF-8.

    Returns
    -------
    path : Path
    """
    path = Path(path)
    payload = data.encode("utf-8") if isinstance(data, str) else data
    temp_path = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
    for attempt in range(_OPEN_ATTEMPTS):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            # "x" rather than mkstemp so the file gets the umask's permissions, not 0600.
            handle = open(temp_path, "xb")
            break
        except FileNotFoundError:
            if attempt == _OPEN_ATTEMPTS - 1:
                raise
    try:
        with handle:
            handle.write(payload)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:
        temp_path.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(dir_path: Path) -> None:
    fd = os.open(dir_path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Atomic file writes: readers see the old content or the new, never a part, even after a crash.

A write that finds its file system full raises `DiskFull`, one line naming the path, the
space it needed and the space left there, so a full results disk is told apart from a
flaky share (which is worth retrying) and from a bug.
"""

from __future__ import annotations

import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["DiskFull", "disk_full_message", "disk_space_for", "human_bytes", "is_disk_full", "write_atomic"]

# ENOSPC: the file system is full; EDQUOT: the user's quota on it is.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFull(OSError):
    """A write found no space left: retrying cannot help until someone frees space.

    Built by `disk_space_for`; its message is the whole story, on one line. It keeps
    OSError's constructor, so it crosses process boundaries (Dask workers) intact.
    """

    def __str__(self) -> str:
        return str(self.strerror)


def is_disk_full(error: BaseException) -> bool:
    """Whether ``error`` is a full file system or an exhausted quota."""
    return isinstance(error, OSError) and error.errno in _NO_SPACE


def human_bytes(n: float) -> str:
    """``1536`` -> ``"1.5 KiB"``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system holding ``path`` (its nearest existing ancestor)."""
    for folder in (path, *path.parents):
        try:
            return shutil.disk_usage(folder).free
        except OSError:
            continue
    return None


@contextmanager
def disk_space_for(path: str | os.PathLike, needed: int) -> Iterator[None]:
    """Turn a full file system while writing ``needed`` bytes to ``path`` into `DiskFull`.

    Parameters
    ----------
    path : path-like
        What is being written (a file, or a store's array folder).
    needed : int
        Bytes the write holds (before compression: an upper bound for compressed stores).
    """
    try:
        yield
    except DiskFull:
        raise
    except OSError as error:
        if not is_disk_full(error):
            raise
        raise DiskFull(error.errno, _message(Path(path), needed), str(path)) from error


def disk_full_message(error: OSError) -> str:
    """One line for a full disk: `DiskFull`'s own, or the path and free space of a library's bare ENOSPC."""
    if isinstance(error, DiskFull):
        return str(error)
    return _message(Path(error.filename) if error.filename else None, None)


def _message(path: Path | None, needed: int | None) -> str:
    free = _free_bytes(path) if path else None
    return (
        f"disk full: writing {path or 'a file'}"
        + (f" needs about {human_bytes(needed)}" if needed is not None else "")
        + (f", {human_bytes(free)} free there" if free is not None else "")
        + "; free space and run again (finished work is kept)"
    )


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
    with disk_space_for(path, len(payload)):
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

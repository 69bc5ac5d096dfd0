"""Identity: one way to name a file's bytes, an array's values and a set of parameters.

Every cache address, checksum and id of the pipeline is one of these sha256 hex digests,
so two places can never disagree on what "the same" means.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

__all__ = ["array_digest", "file_digest", "params_key", "path_segment", "tree_fingerprint"]

_CHUNK_BYTES = 1 << 20
_SEGMENT_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789._-")


def file_digest(path: str | os.PathLike) -> str:
    """The sha256 of a file's bytes, read in 1 MiB chunks (64 hex characters).

    Raises
    ------
    OSError
        When the file cannot be opened or read.
    """
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def array_digest(values: np.ndarray) -> str:
    """The sha256 of an array's values in C order (dtype and shape are the caller's to fix)."""
    return hashlib.sha256(np.ascontiguousarray(values).tobytes()).hexdigest()


def params_key(payload: object, *, length: int = 64) -> str:
    """The sha256 of ``payload`` as canonical JSON (sorted keys), cut to ``length`` hex digits.

    ``payload`` is made of dicts, lists, strings and numbers: everything that decides a result.
    """
    text = json.dumps(payload, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:length]


def path_segment(name: str) -> str:
    """``name`` as one path segment: every byte outside ``[A-Za-z0-9._-]`` becomes ``%XX``."""
    return "".join(
        char if char in _SEGMENT_SAFE else "".join(f"%{byte:02X}" for byte in char.encode("utf-8")) for char in name
    )


def tree_fingerprint(*dirs: Path) -> str:
    """Names, sizes and modification times of every file below ``dirs``, hashed.

    Cheap (no data is read) and changes whenever a store is written or damaged, so it can
    be part of a cache key: a cached task result is only trusted while its stores stand.
    """
    digest = hashlib.sha256()
    for root in dirs:
        if not root.exists():
            continue
        for dirpath, _, files in sorted(os.walk(root)):
            for name in sorted(files):
                stat = os.stat(os.path.join(dirpath, name))
                digest.update(f"{dirpath}/{name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()

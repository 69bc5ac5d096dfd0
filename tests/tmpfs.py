"""A small tmpfs for the full-disk tests: mounted for real, so the kernel says ENOSPC."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


@contextmanager
def small_tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder``, unmounted at the end.

    Skipped only where the test cannot be root; as root (CI) a failed mount is a failure,
    so the full-disk tests cannot pass by never running.
    """
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], capture_output=True)
    assert mounted.returncode == 0, f"mount -t tmpfs failed as root: {mounted.stderr.decode().strip()}"
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)

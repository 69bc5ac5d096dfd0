"""Advisory file locks: one writer per store, one run per (results folder, date, backbone)."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["check_writable", "exclusive_lock", "run_lock"]


def check_writable(out_dir: Path) -> None:
    """Fail at once, naming the folder, when results cannot be written there."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        probe = out_dir / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        raise PermissionError(f"results folder {out_dir} is not writable: {error.strerror or error}") from error


@contextlib.contextmanager
def exclusive_lock(path: Path, *, waiting_message: str | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path``, saying ``waiting_message`` if someone else has it.

    The OS drops the lock when its holder dies, so a crashed run never blocks the next.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_message:
                _warn(waiting_message)
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def run_lock(out_dir: str | Path, day: str, backbone_key: str) -> Iterator[None]:
    """Hold ``OUT/locks/<date>__<backbone>.lock`` for the whole run.

    A second run of the same date and backbone waits for the first instead of interleaving
    its writes; runs of other dates or backbones go ahead.
    """
    out = Path(out_dir)
    check_writable(out)
    path = out / "locks" / f"{day}__{backbone_key}.lock"
    with exclusive_lock(
        path, waiting_message=f"another run for {day} with {backbone_key} holds {path}; waiting for it to finish"
    ):
        yield


def _warn(message: str) -> None:
    logger.warning(message)
    # A process that has not imported Prefect (a Dask worker: it imports this module for the stores'
    # locks) runs no flow whose log could take the message, and importing Prefect costs it 0.8 s.
    if "prefect" not in sys.modules:
        return
    from prefect import get_run_logger
    from prefect.exceptions import MissingContextError

    try:
        get_run_logger().warning(message)
    except MissingContextError:  # outside a flow run the module logger has said it
        pass

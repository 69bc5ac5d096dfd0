"""Progress a person sees: a CLI bar and, inside a Prefect task, a progress artifact."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from tqdm.auto import tqdm

from .identity import params_key

__all__ = ["artifact_key", "progress_bar"]


@contextlib.contextmanager
def progress_bar(key: str, description: str) -> Iterator[Any]:
    """A callback(done, total) feeding a CLI bar (when MUSC_PROGRESS=1) and a Prefect progress artifact."""
    bar = tqdm(desc=description, disable=os.environ.get("MUSC_PROGRESS") != "1", leave=True)
    artifact = create_progress_artifact(0.0, key=key, description=description) if TaskRunContext.get() else None
    last = [-100.0]

    def update(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()
        percent = 100.0 * done / total if total else 100.0
        if artifact is not None and (percent - last[0] >= 5 or done == total):
            update_progress_artifact(artifact, percent)
            last[0] = percent

    try:
        yield update
    finally:
        bar.close()


def artifact_key(name: str) -> str:
    """A Prefect artifact key for ``name`` (lowercase letters, digits, dashes), unique per name."""
    cleaned = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return (cleaned or "product")[:40] + "-" + params_key(name, length=6)

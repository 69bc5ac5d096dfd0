"""Progress a person sees: a CLI bar (in a log file a line per quarter) and, in a Prefect task, a progress artifact."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

from prefect.artifacts import create_progress_artifact, update_progress_artifact
from prefect.context import TaskRunContext
from tqdm.auto import tqdm

from .identity import params_key

__all__ = ["ArtifactPace", "artifact_key", "progress_bar"]

# A stage's progress in a log file (cron, `musc score ... > night.log 2>&1`): a line as it passes each
# quarter. A bar there is one line of carriage returns per update, and with a bar per product the
# cursor moves between them; a night's log then held kilobytes of one "line" per stage.
LOGGED_STEPS = 4

# A progress artifact is one request to the Prefect API from the flow's thread (10-30 ms with a
# local server, plus the server's own work): a 90-image night sent 30 of them in 4 s, 0.53 s of
# the thread that submits the stages' tasks. A person watching the UI needs one a second at most.
ARTIFACT_MIN_STEP = 5.0  # percentage points
ARTIFACT_MIN_INTERVAL_S = 1.0


@contextlib.contextmanager
def progress_bar(key: str, description: str) -> Iterator[Any]:
    """A callback(done, total) feeding the CLI's progress (when MUSC_PROGRESS=1) and a Prefect progress artifact.

    On a terminal the CLI's progress is a bar; when stderr is not one, a short line as each
    quarter of the work is done: ``tokens brick: 6/12 (50 %) after 3.1 s``.
    """
    shown = os.environ.get("MUSC_PROGRESS") == "1"
    on_terminal = shown and sys.stderr.isatty()
    bar = tqdm(desc=description, disable=not on_terminal, leave=True)
    artifact = create_progress_artifact(0.0, key=key, description=description) if TaskRunContext.get() else None
    started = time.monotonic()
    pace = ArtifactPace()
    logged = [0]  # quarters already logged

    def update(done: int, total: int) -> None:
        bar.total, bar.n = total, done
        bar.refresh()
        percent = 100.0 * done / total if total else 100.0
        if shown and not on_terminal and total:
            step = int(percent * LOGGED_STEPS // 100)
            if step > logged[0]:
                logged[0] = step
                elapsed = time.monotonic() - started
                print(f"{description}: {done}/{total} ({percent:.0f} %) after {elapsed:.1f} s", file=sys.stderr)
        if artifact is not None and pace.due(percent, final=done == total):
            update_progress_artifact(artifact, percent)

    try:
        yield update
    finally:
        bar.close()


class ArtifactPace:
    """When a progress artifact is worth an update: the final value, else a step forward and a pause.

    ``due(percent, final)`` is True, and records ``percent`` as sent, when ``percent`` differs from
    the last value sent and either ``final`` is True or it is at least ``min_step`` points past
    that value and ``min_interval`` seconds (``clock``) have passed since that update. The pace
    starts where the artifact does: at 0 % when it is made.
    """

    def __init__(
        self,
        min_step: float = ARTIFACT_MIN_STEP,
        min_interval: float = ARTIFACT_MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.min_step, self.min_interval, self.clock = min_step, min_interval, clock
        self.sent, self.sent_at = 0.0, clock()

    def due(self, percent: float, *, final: bool = False) -> bool:
        now = self.clock()
        if percent == self.sent:
            return False
        stepped = percent - self.sent >= self.min_step
        if not (final or (stepped and now - self.sent_at >= self.min_interval)):
            return False
        self.sent, self.sent_at = percent, now
        return True


def artifact_key(name: str) -> str:
    """A Prefect artifact key for ``name`` (lowercase letters, digits, dashes), unique per name."""
    cleaned = "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    return (cleaned or "product")[:40] + "-" + params_key(name, length=6)

"""Failpoints for crash tests: ``MUSC_KILL_AT=name:n`` SIGKILLs the process at the n-th hit.

A no-op unless the variable is set. The resume tests use it to crash a real run at an
exact point of a stage instead of racing a timer. Several points: ``a:1,b:3``. With
``MUSC_KILL_ONCE_DIR`` set, only the first process to reach a point dies (it leaves a file
named after the point there), so a restarted Dask worker does not die again.

``MUSC_PAUSE_AT=name`` with ``MUSC_PAUSE_DIR`` pauses instead: the process writes
``<name>.paused`` there and waits until a file ``<name>.go`` appears, so a test can do
something (stop a server) at an exact point of a run.
"""

import os
import signal
import time
from collections import Counter
from pathlib import Path

_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    """SIGKILL this process at the n-th hit of ``name`` when ``MUSC_KILL_AT`` lists ``name:n`` (or pause there)."""
    if os.environ.get("MUSC_PAUSE_AT") == name:
        _pause(name, Path(os.environ["MUSC_PAUSE_DIR"]))
    target = os.environ.get("MUSC_KILL_AT")
    if not target:
        return
    for spec in target.split(","):
        point, _, count = spec.partition(":")
        if point != name:
            continue
        _hits[name] += 1
        if _hits[name] >= int(count or 1) and _first_to_die(name):
            os.kill(os.getpid(), signal.SIGKILL)


def _first_to_die(name: str) -> bool:
    folder = os.environ.get("MUSC_KILL_ONCE_DIR")
    if not folder:
        return True
    try:
        os.close(os.open(os.path.join(folder, name), os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def _pause(name: str, folder: Path) -> None:
    """Announce ``<name>.paused`` and wait for ``<name>.go`` (once per process)."""
    if _hits[f"pause:{name}"]:
        return
    _hits[f"pause:{name}"] += 1
    (folder / f"{name}.paused").touch()
    while not (folder / f"{name}.go").exists():
        time.sleep(0.2)

"""Failpoints for crash tests: ``MUSC_KILL_AT=name:n`` SIGKILLs the process at the n-th hit.

A no-op unless the variable is set. The resume tests use it to crash a real run at an
exact point of a stage instead of racing a timer.
"""

import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


def failpoint(name: str) -> None:
    """SIGKILL this process at the n-th hit of ``name`` when ``MUSC_KILL_AT=name:n``."""
    target = os.environ.get("MUSC_KILL_AT")
    if not target:
        return
    point, _, count = target.partition(":")
    if point != name:
        return
    _hits[name] += 1
    if _hits[name] >= int(count or 1):
        os.kill(os.getpid(), signal.SIGKILL)

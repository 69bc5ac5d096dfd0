"""Other processes for end-to-end tests: start them in their own group, wait on them, read their logs."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def tail(path: Path, lines: int = 80) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return f"<{path} not written>"
    return f"--- last {min(lines, len(text))} lines of {path.name} ---\n" + "\n".join(text[-lines:])


@contextmanager
def background(command: list[str], env: dict[str, str], log: Path, cwd: Path = REPO) -> Iterator[subprocess.Popen]:
    """A process in its own group (its children die with it), output to ``log``."""
    with open(log, "wb") as out:
        process = subprocess.Popen(
            command, env=env, cwd=cwd, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield process
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen, grace: float = 15.0) -> None:
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=wait)
            # The leader is gone; children in the group may linger.
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def wait_for(what: str, check: Callable[[], object], timeout: float, logs: list[Path], interval: float = 1.0):
    """Poll ``check`` until it returns something truthy; fail with the log tails otherwise."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except AssertionError:
            raise
        except Exception as error:  # noqa: BLE001 - keep polling, report the last one
            last_error = error
        time.sleep(interval)
    pytest.fail(
        f"timed out after {timeout:.0f} s waiting for {what}"
        + (f" (last error: {last_error!r})" if last_error else "")
        + "\n"
        + "\n".join(tail(log) for log in logs)
    )


def wait_until_idle(address: str, timeout_seconds: float = 60) -> None:
    """Until the Dask cluster at ``address`` holds no task: a crashed or failed run's tasks finish after it."""
    from distributed import Client

    with Client(address) as client:
        deadline = time.monotonic() + timeout_seconds

        def busy():
            executing = client.run(lambda dask_worker: len(dask_worker.state.executing))
            return client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks)) or any(executing.values())

        while busy():
            assert time.monotonic() < deadline, "the Dask cluster did not drain after the crash"
            time.sleep(0.2)

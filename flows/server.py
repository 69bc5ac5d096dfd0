"""The temporary Prefect server of a `musc` command, started while the flows import instead of after.

Without a Prefect server (`PREFECT_API_URL` unset), Prefect's first API call starts a temporary
one and waits for it: a subprocess that runs Prefect's server app under uvicorn and opens (on the
first run in a `PREFECT_HOME`, creates and migrates) its SQLite database, seconds of one core.
Importing the flows (torch, Dask, Zarr) is seconds of another core. `server_starting` runs the
two side by side, and starts that subprocess itself: Prefect's own starter lives in its server
package, whose import cost the command 1.4 s of its own core (the API's routes, the ORM) for a
class that spawns one process and polls it. The process is the one Prefect's starter runs (the
same app, through `create_app`, with the same options and environment); once it answers, this
process's Prefect settings point at it, so every Prefect client of the command, in any thread,
finds it as a configured server.

The server ends with its command: stopped at the command's exit (a SIGTERM to the command
comes to the same), and, when the command is killed outright (SIGKILL, the kernel's OOM killer)
and runs nothing, by a watch in the server's own process (`create_app`).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

PORT_TAKEN = 3  # uvicorn's exit status when it cannot bind its port: Prefect's starter then tries another
# What Prefect's starter adds to the server's environment: no UI, the temporary server's services only
TEMPORARY_SERVER_ENV = {"PREFECT_UI_ENABLED": "0", "PREFECT__SERVER_EPHEMERAL": "1", "PREFECT__SERVER_FINAL": "1"}


class TemporaryServer:
    """One temporary Prefect server process on a free loopback port; `stop` ends it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen | None = None
        self.port = 0
        self.start()

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> None:
        import prefect
        from prefect.settings import get_current_settings

        self.port = free_port()
        env = {
            **os.environ,
            **TEMPORARY_SERVER_ENV,
            **get_current_settings().to_environment_variables(exclude_unset=True),
        }
        env[COMMAND_PID_ENV] = str(os.getpid())
        app_dir = str(Path(prefect.__file__).parent.parent)
        command = [sys.executable, "-m", "uvicorn", "--app-dir", app_dir, "--factory"]
        command += [f"{__name__}:create_app", "--host", "127.0.0.1", "--port", str(self.port)]
        command += ["--log-level", "error", "--lifespan", "on"]
        self.process = subprocess.Popen(command, env=env)

    def wait_until_answering(self, timeout: float) -> None:
        """Poll its health until it answers (on a new port if its own was taken); `RuntimeError` past ``timeout`` s."""
        import httpx

        deadline = time.monotonic() + timeout
        with httpx.Client() as client:
            while time.monotonic() < deadline:
                status = self.process.poll()
                if status == PORT_TAKEN:
                    self.start()
                    continue
                if status is not None:
                    raise RuntimeError(f"the temporary Prefect server exited with status {status} before it answered")
                with contextlib.suppress(httpx.TransportError):
                    if client.get(f"{self.api_url}/health").status_code == 200:
                        return
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(
            f"the temporary Prefect server did not answer within {timeout:.0f} s"
            " (PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS)"
        )

    def stop(self) -> None:
        """End the server as Prefect's starter does: terminate, then kill after 5 s."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.process = None


# The command's pid in its server's environment (`TemporaryServer.start`), for the server's watch.
COMMAND_PID_ENV = "MUSC_SERVER_COMMAND_PID"
WATCH_INTERVAL_S = 1.0


def create_app():
    """In the server's process: Prefect's server app, and a thread that stops the server once its command is gone.

    The thread sees the command gone when this process is handed to another parent, and sends
    the server the SIGTERM its command would have sent: uvicorn stops as it always does,
    instead of holding its port, its database and its memory for ever.
    """
    from prefect.server.api.server import create_app as prefect_app

    command = os.environ.get(COMMAND_PID_ENV)
    if command is not None:
        threading.Thread(target=_stop_when_gone, args=(int(command),), name="musc-command-watch", daemon=True).start()
    return prefect_app()


def _stop_when_gone(command: int) -> None:
    while os.getppid() == command:
        time.sleep(WATCH_INTERVAL_S)
    os.kill(os.getpid(), signal.SIGTERM)


def free_port() -> int:
    """A loopback port free now (the server's start retries when another process takes it first)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def server_starting() -> Iterator[None]:
    """Start the temporary Prefect server for the block; on exit, wait until it answers and use it.

    From then on ``PREFECT_API_URL`` names it, in this process's environment and Prefect's
    settings, so a later command in the same process finds it running, as Prefect's own
    temporary server is found; it stops when the process exits. Nothing happens when a server
    is configured or the temporary one is turned off.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_SERVER_EPHEMERAL_ENABLED,
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS,
    )

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    server = TemporaryServer()
    # At exit, as Prefect's starter does: after the exit handlers registered later (the flows'
    # clients and log workers, last to need the server) have run. An error in the block leaves it there too.
    atexit.register(server.stop)
    yield
    server.wait_until_answering(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS.value())
    use_server(server.api_url)
    TEMPORARY_API_URLS.add(server.api_url)


TEMPORARY_API_URLS: set[str] = set()  # the servers `server_starting` started in this process


def use_server(api_url: str) -> None:
    """Point this process's Prefect at ``api_url``, its temporary server, with no flow run heartbeats.

    The URL goes into the environment and the settings every thread falls back to. Heartbeats
    let a server mark a run crashed when its process dies; this server dies with the process, so
    nothing would read them, and a flow's end waited up to 1 s for the heartbeat thread's sleep.
    """
    import prefect.context
    from prefect.context import SettingsContext
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY

    os.environ["PREFECT_API_URL"] = api_url
    prefect.context.refresh_global_settings_context()
    fallback = prefect.context.GLOBAL_SETTINGS_CONTEXT
    settings = fallback.settings.copy_with_update(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None})
    prefect.context.GLOBAL_SETTINGS_CONTEXT = SettingsContext(profile=fallback.profile, settings=settings)

"""The temporary Prefect server of a `musc` command, started while the flows import instead of after.

Without a Prefect server (`PREFECT_API_URL` unset), the first flow call starts Prefect's
temporary server and waits for it: a subprocess that imports Prefect's server and opens (on
the first run in a `PREFECT_HOME`, creates and migrates) its SQLite database, seconds of one
core, while this process waits. Importing the flows (torch, Dask, Zarr) is seconds of another
core. `server_starting` runs the two side by side: Prefect's own server object is started in a
thread and is the one the flow's client then finds running.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator


@contextlib.contextmanager
def server_starting() -> Iterator[None]:
    """Start the temporary Prefect server in a thread for the block; on exit, wait until it answers.

    Nothing happens when a server is configured or the temporary one is turned off.
    """
    from prefect.settings import PREFECT_API_URL, PREFECT_SERVER_EPHEMERAL_ENABLED

    if PREFECT_API_URL.value() or not PREFECT_SERVER_EPHEMERAL_ENABLED.value():
        yield
        return
    # Imported here, not in the thread: two threads importing interdependent modules at once
    # can see each other's half-initialised modules. The thread only spawns and polls.
    from prefect.server.api.server import SubprocessASGIServer

    # The flow's client asks the same object (one per port; None: the temporary one) and finds it running.
    server = SubprocessASGIServer()
    failed: list[Exception] = []
    thread = threading.Thread(target=_start, args=(server, failed), name="prefect-server-start", daemon=True)
    thread.start()
    yield  # an error in the block leaves the server to the exit's clean-up (Prefect's atexit stop)
    thread.join()
    if failed:  # as the flow's own start would have raised it; a second start would orphan the first process
        raise failed[0]


def _start(server, failed: list[Exception]) -> None:
    try:
        server.start()
    except Exception as error:  # noqa: BLE001 - handed to the main thread
        failed.append(error)

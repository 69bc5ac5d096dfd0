"""A command's temporary Prefect server (`flows.server`): no server package imported, found by all, gone at exit."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from flows import server as server_module
from flows.server import TemporaryServer

pytestmark = pytest.mark.e2e

REPO = Path(__file__).parents[2]
A_COMMAND = """
import os, sys
from flows.server import server_starting
with server_starting():
    pass
from prefect import flow, task

@task
def double(x):
    return 2 * x

@flow
def night():
    return double.submit(21).result()  # a task on the flow's thread pool: another thread, the same server

from prefect.settings import get_current_settings

heartbeats = get_current_settings().flows.heartbeat_frequency  # none: nothing outlives this server to read them
print(night(), os.environ["PREFECT_API_URL"], "prefect.server.api.server" in sys.modules, heartbeats, flush=True)
"""


def answers(api_url: str) -> bool:
    try:
        return httpx.get(f"{api_url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_a_command_runs_its_flow_on_its_own_server_without_importing_prefects_server(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO), DO_NOT_TRACK="1")
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    done = subprocess.run(
        [sys.executable, "-c", A_COMMAND], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result, api_url, imported_server, heartbeats = done.stdout.split()
    assert result == "42" and heartbeats == "None"
    assert api_url.startswith("http://127.0.0.1:") and api_url.endswith("/api")
    assert imported_server == "False"
    # The flow run is in the home's database, written by that server
    assert (tmp_path / "home" / "prefect.db").exists()
    # Stopped at the command's exit: nothing answers on its port any more
    deadline = time.monotonic() + 10
    while answers(api_url) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not answers(api_url)


def test_a_taken_port_moves_the_server_to_another(monkeypatch):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        taken_port = taken.getsockname()[1]
        ports = iter([taken_port])
        free_port = server_module.free_port
        monkeypatch.setattr(server_module, "free_port", lambda: next(ports, None) or free_port())
        server = TemporaryServer()
        try:
            assert server.port == taken_port
            server.wait_until_answering(timeout=180)
            assert server.port != taken_port
            assert answers(server.api_url)
        finally:
            server.stop()
    assert server.process is None and not answers(server.api_url)

"""A command's temporary Prefect server (`flows.server`): no server package imported, found by all, gone at exit."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest

from flows import server as server_module
from flows.server import TemporaryServer

from ..conftest import TINY_SPEC, backbone_options

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


HOLDING_ITS_SERVER = """
import os, time
from flows.server import server_starting
with server_starting():
    pass
print(os.environ["PREFECT_API_URL"], flush=True)
time.sleep(600)
"""


def test_a_command_killed_outright_takes_its_server_with_it(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(tmp_path / "home"), PYTHONPATH=str(REPO), DO_NOT_TRACK="1")
    env.update(PREFECT_SERVER_ANALYTICS_ENABLED="false", PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    command = subprocess.Popen(
        [sys.executable, "-c", HOLDING_ITS_SERVER], env=env, cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    server = None
    try:
        api_url = command.stdout.readline().strip()
        assert answers(api_url)
        (server,) = [p for p in psutil.Process(command.pid).children() if "uvicorn" in " ".join(p.cmdline())]
        command.kill()  # SIGKILL: no exit handler of the command runs
        command.wait(timeout=30)
        server.wait(timeout=60)  # its watch saw the command gone and stopped it
        assert not answers(api_url)
    finally:
        command.kill()
        if server is not None and server.is_running():
            server.kill()


def processes_left(marker: str, wait_s: float = 30.0) -> list[str]:
    """Command lines of live processes started under ``marker`` (its environment), given ``wait_s`` to end.

    The forkserver and its workers end once they see their command gone; the server only if
    the command stopped it.
    """
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for process in psutil.process_iter(["cmdline", "environ"]):
            if _started_under(process, marker):
                left.append(" ".join(process.info["cmdline"] or ()))
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


@pytest.fixture(scope="module")
def prefect_home(tmp_path_factory):
    return tmp_path_factory.mktemp("prefect-home")  # one database for the module: migrated once


@pytest.mark.parametrize(
    "when", ["starting the run's local Dask cluster with the command", "Beginning flow run"]
)  # before Prefect's flow engine, and inside it (where Prefect's own SIGTERM handler comes first)
def test_sigterm_ends_a_command_with_its_server_and_workers(demo_day, prefect_home, tmp_path, when):
    marker = str(uuid.uuid4())
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env.update(PREFECT_HOME=str(prefect_home), PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", MUSC_RUN_MARKER=marker)
    env.update(DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false", PYTHONFAULTHANDLER="1")
    command = [sys.executable, "-m", "musc_tasks.cli", "-v", "score", str(demo_day.input_dir)]
    command += ["--out", str(tmp_path / "out"), "--date", "2026-11-22", *backbone_options(TINY_SPEC)]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seen = []
    for line in process.stderr:
        seen.append(line)
        if when in line:
            process.send_signal(signal.SIGTERM)  # as a scheduler's stop or `timeout` sends it
            break
    try:  # a server left behind would hold the pipe open: reading to its end would never return
        rest = process.communicate(timeout=120)[1]
    except subprocess.TimeoutExpired:  # stuck: its threads' stacks (faulthandler's on SIGABRT) say where
        process.send_signal(signal.SIGABRT)
        time.sleep(5)
        left = processes_left(marker, wait_s=0)
        _kill_started_under(marker)  # what holds the pipe open
        rest = process.communicate(timeout=30)[1]
        pytest.fail(f"still running 120 s after the SIGTERM: {left}\n" + ("".join(seen) + rest)[-12000:])
    finally:
        left = processes_left(marker)  # the temporary server, the forkserver and the workers
        _kill_started_under(marker)  # nothing of a failed run outlives the test
    assert process.returncode == 128 + signal.SIGTERM, ("".join(seen) + rest)[-3000:]
    assert left == []


def _kill_started_under(marker: str) -> None:
    for pid in [p.pid for p in psutil.process_iter(["environ"]) if _started_under(p, marker)]:
        with contextlib.suppress(psutil.Error):
            psutil.Process(pid).kill()


def _started_under(process: psutil.Process, marker: str) -> bool:
    with contextlib.suppress(psutil.Error):
        return (process.info["environ"] or {}).get("MUSC_RUN_MARKER") == marker
    return False

"""Extraction and mutual scoring on a Dask cluster that someone else runs: `dask scheduler` and `dask worker`.

The cluster is two separate processes on 127.0.0.1, as a site would start them; `musc score
--dask-address` must send the extraction, pair and row tasks there and give the same scores
as the LocalCluster it would otherwise start, even though one worker process is SIGKILLed in
the middle of an extraction task and one in the middle of a pair task (their nanny restarts
them; the scheduler reruns their tasks on the workers left).
"""

import os
import sys
import time
from pathlib import Path

import pytest
from distributed import Client

from musc_tasks import tables

from .conftest import score
from .processes import background, free_port, tail, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent


@pytest.fixture
def external_cluster(tmp_path):
    """(scheduler address, logs) of a scheduler and a 2-process worker started from the shell."""
    address = f"tcp://127.0.0.1:{free_port()}"
    scheduler_log, worker_log = tmp_path / "scheduler.log", tmp_path / "worker.log"
    port = address.rsplit(":", 1)[1]
    scheduler = [str(BIN / "dask"), "scheduler", "--host", "127.0.0.1", "--port", port, "--no-dashboard"]
    worker = [str(BIN / "dask"), "worker", address, "--nworkers", "2", "--nthreads", "1", "--no-dashboard"]
    worker += ["--preload", "musc_tasks.worker_imports"]  # as README says
    logs = [scheduler_log, worker_log]
    kills = tmp_path / "kills"
    kills.mkdir()
    # the first worker process at its 2nd extraction block, and the first at its 3rd block pair, die
    dying = dict(os.environ, MUSC_KILL_AT="worker-extract:2,worker-pair:3", MUSC_KILL_ONCE_DIR=str(kills))
    with background(scheduler, dict(os.environ, PYTHONUNBUFFERED="1"), scheduler_log):
        # workers in a folder of their own, as on another machine: every path they get must be absolute
        elsewhere = tmp_path / "worker-cwd"
        elsewhere.mkdir()
        with background(worker, dict(dying, PYTHONUNBUFFERED="1"), worker_log, cwd=elsewhere):
            with Client(address, timeout=120) as client:
                wait_for("two Dask workers", lambda: len(client.scheduler_info()["workers"]) == 2, 120, logs)
            yield address, logs


def test_external_cluster_runs_the_stages_and_survives_killed_workers(
    external_cluster, demo_day, prefect_api, local_cli_run, tmp_path
):
    address, logs = external_cluster
    started = time.monotonic()
    done = score(demo_day, tmp_path / "external", prefect_api, address)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:] + "\n".join(tail(log) for log in logs)

    with Client(address, timeout=60) as client:
        prefixes = client.run_on_scheduler(lambda dask_scheduler: sorted(dask_scheduler.task_prefixes))
    assert {"extract_blocks_task", "score_block_pair", "assemble_row_block"} <= set(prefixes), prefixes
    assert sorted(p.name for p in (tmp_path / "kills").iterdir()) == ["worker-extract", "worker-pair"]

    columns = ["path", "raw_score", "score", "rank"]
    external_scores = tables.read_table(tmp_path / "external" / "tables" / "scores")[columns].sort_values("path")
    local_scores = tables.read_table(local_cli_run / "tables" / "scores")[columns].sort_values("path")
    assert len(external_scores) == len(demo_day.images), f"took {time.monotonic() - started:.0f} s"
    assert external_scores.reset_index(drop=True).equals(local_scores.reset_index(drop=True))

"""Cluster faults on real processes: an unreachable scheduler, workers SIGKILLed mid-stage.

The cluster is a `dask scheduler` and a `dask worker --nworkers 2` started from the shell,
as a site runs them (see tests/e2e/test_dask_external.py for the undisturbed run).
"""

import sys
import time
from pathlib import Path

import pytest

from .processes import free_port
from .test_dask_external import score

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent


def test_an_unreachable_scheduler_stops_the_run_within_seconds(demo_day, prefect_api, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    started = time.monotonic()
    done = score(demo_day, tmp_path / "out", prefect_api, address)
    took = time.monotonic() - started
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    assert f"Dask scheduler at {address} did not answer" in done.stderr, done.stderr[-3000:]
    assert not list((tmp_path / "out").rglob("*.zarr")), "no work may start without the cluster"
    assert took < 120, f"took {took:.0f} s"  # 10 s connect timeout plus the CLI's start-up on a loaded machine

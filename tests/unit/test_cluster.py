"""The run's local Dask cluster."""

import os

from musc_tasks.cluster import dask_client


def test_local_workers_keep_glibc_malloc_thresholds(monkeypatch):
    """Dask's default MALLOC_TRIM_THRESHOLD_ (page faults on every large tensor) does not reach the local workers."""
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)  # an earlier cluster's nanny sets it in this process
    with dask_client(n_workers=1) as client:
        trim, threads = client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_"), client.run(os.getenv, "OMP_NUM_THREADS")
    assert list(trim.values()) == [None]
    assert list(threads.values()) == ["1"]  # Dask's other variables are kept: one thread per worker

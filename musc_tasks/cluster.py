"""The run's one Dask cluster: an existing scheduler checked within seconds, or a LocalCluster for the run.

Kept apart from the stages and light on imports (no torch): the local workers unpickle
`ExitAfterClose` when the cluster starts, and importing it must not make every worker load
torch before the run's first task does.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import sys
from collections.abc import Iterator

from distributed import Client, LocalCluster, WorkerPlugin
from distributed.core import Status

CONNECT_TIMEOUT_S = 10  # an unreachable scheduler fails the run within this, not after Dask's own 30 s


class SchedulerUnreachable(RuntimeError):
    """The Dask scheduler of ``--dask-address`` did not answer (not an OSError: retrying the stage cannot help)."""


@contextlib.contextmanager
def dask_client(address: str | None = None, *, n_workers: int | None = None) -> Iterator[Client]:
    """A client of the cluster at ``address``, or of a LocalCluster started for the block.

    Local workers are processes with one thread each: torch then uses one core per worker
    (Dask sets OMP_NUM_THREADS=1 in its workers) and the GEMMs do not fight over cores.
    """
    if address:
        try:
            client = Client(address, timeout=CONNECT_TIMEOUT_S)
        except OSError as error:
            raise SchedulerUnreachable(
                f"Dask scheduler at {address} did not answer within {CONNECT_TIMEOUT_S} s ({error}); "
                "start it (`dask scheduler`) or fix --dask-address / MUSC_DASK_ADDRESS"
            ) from None
        with client:
            yield client
        return
    with dask_cluster(None, n_workers=n_workers) as local, Client(local) as client:
        yield client


def check_scheduler(address: str | None) -> None:
    """Raise `SchedulerUnreachable` within seconds unless the scheduler at ``address`` answers (None: no check)."""
    if address:
        with dask_client(address):
            pass


@contextlib.contextmanager
def dask_cluster(address: str | None = None, *, n_workers: int | None = None) -> Iterator[str]:
    """The scheduler address one run shares across its stages: ``address`` once it answers, or a LocalCluster's.

    The local cluster has one single-threaded worker process per core, at most 8, and no
    more than the memory allows for one backbone each (`LOCAL_WORKER_MEMORY`): every
    extraction worker keeps its model loaded.
    """
    if address:
        check_scheduler(address)
        yield address
        return
    workers = n_workers or local_worker_count()
    # A task's error reaches the client, which reports it: the workers' own "Compute Failed"
    # records would print it again, so a quiet console (Dask's loggers above INFO) drops them.
    silence = logging.ERROR if logging.getLogger("distributed").isEnabledFor(logging.INFO) else logging.CRITICAL
    with LocalCluster(
        n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=None, silence_logs=silence
    ) as cluster:
        with Client(cluster) as client:
            client.register_plugin(ExitAfterClose(), name="musc-exit-after-close")
        yield cluster.scheduler_address


class ExitAfterClose(WorkerPlugin):
    """A local worker process that closed cleanly ends at once, skipping the interpreter's teardown.

    Tearing down an interpreter that imported torch (and Prefect) takes seconds on a busy
    machine, longer than the 4 s a nanny waits before it kills the process and warns, so
    every run ended with one warning per worker and a few idle seconds. Everything a task
    writes is fsynced and renamed before the task returns; the output streams are flushed
    here. A worker that did not close cleanly (a crash) exits the ordinary way.
    """

    def setup(self, worker) -> None:
        atexit.register(_exit_if_closed, worker)  # registered last, so it runs first


def _exit_if_closed(worker) -> None:
    if worker.status == Status.closed:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(0)


LOCAL_WORKER_MEMORY = 6 * 2**30  # ViT-L weights, a block's activations and a pool task's blocks, with room


def local_worker_count() -> int:
    """Worker processes of the default local cluster: one per core, at most 8, each with LOCAL_WORKER_MEMORY."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(os.cpu_count() or 1, 8, memory // LOCAL_WORKER_MEMORY))

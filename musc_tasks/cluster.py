"""The run's one Dask cluster: an existing scheduler checked within seconds, or a LocalCluster for the run.

Kept apart from the stages and light on imports (no torch): the workers unpickle
`ExitAfterClose` and `warm_worker` in their event loop, which must not import the stages there
while a task thread imports (python/cpython#106905). The local workers import torch and the
stages once, as they start (`worker_imports`, Dask's preload), or a `musc` command's are forked
from a process that imported them (`forked_workers`); workers started by hand without it import
them with their first task.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import multiprocessing.forkserver
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import dask
from distributed import Client, Future, LocalCluster, WorkerPlugin
from distributed.core import Status
from distributed.utils import get_mp_context

if TYPE_CHECKING:  # pydantic and the config stay out of what a worker imports to unpickle the plugin
    from .config import BackboneSpec

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 10  # an unreachable scheduler fails the run within this, not after Dask's own 30 s
WARM_UP_GRACE_S = 60  # a closing run waits this long for its workers' warm-up (imports, weights from the disk)


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
    with start_local_cluster(n_workers) as local, Client(local) as client:
        yield client


def check_scheduler(address: str | None) -> None:
    """Raise `SchedulerUnreachable` within seconds unless the scheduler at ``address`` answers (None: no check)."""
    if address:
        with dask_client(address):
            pass


def start_local_cluster(n_workers: int | None = None, *, forked: bool = False) -> LocalCluster:
    """The run's kind of LocalCluster, started, its workers ending at once when closed (`ExitAfterClose`).

    One single-threaded worker process per core, at most 8, and no more than the memory allows
    for one backbone each (`LOCAL_WORKER_MEMORY`): every extraction worker keeps its model loaded.
    ``forked``: the workers are forked from the process's forkserver (`forked_workers`), not spawned.
    """
    workers = n_workers or local_worker_count()
    # A task's error reaches the client, which reports it: the workers' own "Compute Failed"
    # records would print it again, so a quiet console (Dask's loggers above INFO) drops them.
    silence = logging.ERROR if logging.getLogger("distributed").isEnabledFor(logging.INFO) else logging.CRITICAL
    # Read by each nanny when it is created, and kept for the restarts of its worker; the scheduler's as it starts.
    local_config = {**KEEP_GLIBC_MALLOC, **NO_DASHBOARD_SAMPLING}
    with dask.config.set(local_config), forked_workers() if forked else contextlib.nullcontext():
        cluster = LocalCluster(
            n_workers=workers,
            threads_per_worker=1,
            processes=True,
            preload=["musc_tasks.worker_imports"],  # every import in one thread, before any task or data
            dashboard_address=None,
            silence_logs=silence,
            # Without a dashboard the scheduler still serves HTTP (health, metrics), on port 8787 by
            # default, moving with a warning when another cluster holds it: a free loopback port.
            scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},
        )
    try:
        with Client(cluster, set_as_default=False) as client:
            client.register_plugin(ExitAfterClose(), name="musc-exit-after-close")
    except BaseException:
        cluster.close()
        raise
    return cluster


class RunCluster:
    """The one Dask cluster of a run (`run_cluster`): its scheduler's address once a stage needs it."""

    def __init__(self, address: str | None = None, *, forked: bool = False) -> None:
        self._address = address
        self._forked = forked  # a local cluster's workers forked from the forkserver (`forked_workers`)
        self._cluster: LocalCluster | None = None
        self._client: Client | None = None
        self._warming: list[Future] = []  # held until the run ends: a released future's task may be dropped
        self._error: BaseException | None = None
        self._starting: threading.Thread | None = None

    def start_warm(self, backbone: BackboneSpec, device: str) -> None:
        """Start the local cluster in a background thread and give each worker `warm_worker` as its first task.

        Nothing happens once the cluster is starting or started, or for an external scheduler: a
        backfill's days call it on the range's one cluster, which the first day with images starts.
        """
        if self._address is not None or self._starting is not None or self._cluster is not None:
            return
        if self._forked:
            prepare_forkserver()
        self._starting = threading.Thread(
            target=self._start, args=(backbone, device), name="musc-cluster-start", daemon=True
        )
        self._starting.start()

    def _start(self, backbone: BackboneSpec | None = None, device: str = "auto") -> None:
        try:
            self._cluster = start_local_cluster(forked=self._forked)
            if backbone is not None:
                self._client = Client(self._cluster, set_as_default=False)
                self._warming = [
                    self._client.submit(
                        warm_worker, backbone, device, workers=[worker], allow_other_workers=False, pure=False
                    )
                    for worker in self._client.scheduler_info()["workers"]
                ]
        except BaseException as error:  # raised where a stage asks for the address
            self._error = error

    def address(self) -> str:
        """The scheduler's address: waits for the local cluster's start (raising its error), or starts it now."""
        if self._address is None:
            if self._starting is None:
                self._start()
            else:
                self._starting.join()
            if self._error is not None:
                raise self._error
            self._address = self._cluster.scheduler_address
        return self._address

    def close(self) -> None:
        """Close a local cluster (waiting for its start first); an external scheduler is left as it is.

        Closing again does nothing: a command's cluster is closed by the flow that used it and
        again when the command's block ends (`local_cluster_starting`).
        """
        if self._starting is not None:
            with contextlib.suppress(RuntimeError):  # a Ctrl-C in Thread.start before the thread began
                self._starting.join()
            self._starting = None
            if self._error is not None and self._address is None:
                log.warning("the run's local Dask cluster did not start: %s", self._error)
        try:
            if self._client is not None:
                # A worker closes only after its running task: one still warming (a run that failed
                # or was interrupted early) would be killed with a warning after the nanny's 4 s.
                deadline = time.monotonic() + WARM_UP_GRACE_S
                for warming in self._warming:
                    with contextlib.suppress(Exception):  # late or lost: the nanny kills it
                        warming.result(timeout=max(0.0, deadline - time.monotonic()))
                self._client.close()  # releases the warm-up futures
        finally:
            if self._cluster is not None:
                self._cluster.close()
            self._client = self._cluster = None
            self._warming = []


# The local cluster a `musc` command started as it began, until its flow's `run_cluster` takes it over.
_started_by_command: RunCluster | None = None
# The local cluster of a `run_cluster(None, shared=True)` block (a backfill's): the runs nested in it use it
# as theirs and leave it open, so a range of days starts one cluster, not one per day.
_shared: RunCluster | None = None


@contextlib.contextmanager
def local_cluster_starting(backbone: BackboneSpec, device: str) -> Iterator[None]:
    """Start the run's local cluster and warm its workers now, for the flow the block calls; closed when it ends.

    For a `musc` command whose flow will use a local cluster on input it has seen images in:
    the workers' imports and model build (seconds of each worker's core) then overlap the
    command's own start (the Prefect server's, the flows' imports) instead of following the
    flow's. The first ``run_cluster(None, ...)`` in the block takes the cluster over and closes
    it when its flow body ends, as it closes its own; the block's end closes it in any case
    (a flow that failed before taking it, an error, Ctrl-C). ``backbone`` and ``device`` are
    the flow's: its extraction finds the model in each worker's cache.
    """
    # Each nanny sets OMP_NUM_THREADS=1 (and MKL's, OpenBLAS's) in this process's own environment as it
    # spawns its worker (Dask's pre-spawn-environ): torch loaded after that ran this process's work
    # (publish, the report) on one thread, 0.9 s longer for 90 images on 2 cores. Loaded first, it keeps its own.
    # (Only the command's process runs this: the module itself stays free of torch for the workers.)
    import torch  # noqa: F401

    global _started_by_command
    cluster = _started_by_command = RunCluster(forked=True)
    try:  # from here: a Ctrl-C may come while the start's thread starts
        cluster.start_warm(backbone, device)
        log.info("starting the run's local Dask cluster with the command")
        yield
    finally:
        _started_by_command = None
        cluster.close()


@contextlib.contextmanager
def run_cluster(
    address: str | None, *, warm_for: BackboneSpec | None = None, device: str = "auto", shared: bool = False
) -> Iterator[RunCluster]:
    """The run's one Dask cluster, for the whole flow body; stages get its address from `RunCluster.address`.

    ``address``: that scheduler, checked now, before any work (an unreachable one fails the
    run within seconds); its workers are used as they are. None: a LocalCluster. With
    ``warm_for`` (the caller saw image files in the input) it starts now in the background,
    and each worker's first task imports the backbone's library and builds the model into
    the worker's model cache (`warm_worker`), while the catalog runs; without it
    the cluster starts when a stage first asks for the address, so a night without images
    starts none. Within a `musc` command's `local_cluster_starting` block the local cluster is
    the one the command already started (the first `run_cluster` of the block takes it over).

    ``shared`` (a flow that runs other flows, the backfill): every ``run_cluster(None, ...)``
    nested in the block gets this local cluster and leaves it open; the block closes it. The
    first nested run with ``warm_for`` starts it warm if nothing has started it yet, and the
    nested runs' warm-up is this one's: they score with the same backbone on the same device.
    """
    global _started_by_command, _shared
    if address is None and _shared is not None:
        log.info("the run uses the local Dask cluster of the run it is nested in")
        if warm_for is not None:
            _shared.start_warm(warm_for, device)
        yield _shared
        return
    if address is None and _started_by_command is not None:
        cluster, _started_by_command = _started_by_command, None
        log.info("the run uses the local Dask cluster its command started")
    else:
        cluster = RunCluster(address)
        if address:
            check_scheduler(address)
        elif warm_for is not None:
            cluster.start_warm(warm_for, device)
    if shared and address is None:
        _shared = cluster
    try:
        yield cluster
    finally:
        if _shared is cluster:
            _shared = None
        cluster.close()


def warm_worker(backbone: BackboneSpec, device: str) -> None:
    """Dask task: load the backbone into this worker's model cache before the first extraction block needs it.

    The cache is `extract.worker_backbone`, keyed by the same spec and device string the
    extraction tasks pass, so their first block finds the model loaded, on the device it
    resolves there, and nothing is loaded twice. A failure (weights missing, no download
    source) is not cached: the first block tries again and raises it with its own message.
    """
    from .extract import worker_backbone  # in this task's thread: preloaded by local workers, not by all

    try:
        worker_backbone(backbone, device)
    except Exception as error:
        log.debug("warming the backbone failed; the first extraction block will retry: %s", error)


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


# Dask starts its workers with MALLOC_TRIM_THRESHOLD_=65536, and any such variable turns off glibc's
# adaptive thresholds: every freed block over 128 KiB goes back to the kernel and the next one is
# page-faulted in again. A pair task allocates a product of tens of MB per GEMM tile, so its workers
# spent a third of their CPU time in the kernel (sys 22 s of 56 s, 12 M page faults, on 3 maps of the
# issue's shape; 1.5 s and 0.4 M without it): the stage on Dask took 1.35x as long as without
# (docs/performance.md). The local workers keep glibc's defaults, as the engine's process has them.
KEEP_GLIBC_MALLOC = {"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}

# A local cluster has no dashboard, yet each worker's event loop sampled its task thread's stack every
# 10 ms for the dashboard's profile (Python-level work that takes the GIL between the model's ops),
# and every Dask server of the run checked its own loop every 20 ms: 2.5 s of the workers' main
# threads per 22 s extraction stage of ViT-B (2 workers), 0.5 s without both (docs/performance.md).
# The check's warning ("Event loop was unresponsive") still fires: it compares the time between
# checks with its limit of 3 s.
NO_DASHBOARD_SAMPLING = {"distributed.worker.profile.enabled": False, "distributed.admin.tick.interval": "1s"}

FORKSERVER = {"distributed.worker.multiprocessing-method": "forkserver"}


@contextlib.contextmanager
def forked_workers() -> Iterator[None]:
    """Within the block, nannies fork their workers from one process that imported the stages once.

    Spawned, every local worker imports torch, scikit-image and the stages itself (`worker_imports`,
    about 3 s of a core each), all at once and beside the command's own start. multiprocessing's
    forkserver imports them once (`forkserver_preload`), in its own fresh process, and forks each
    worker from there. A command starts it as it begins (`start_forkserver`); otherwise it starts
    with the first worker, after the nanny wrote Dask's pre-spawn environment (``OMP_NUM_THREADS=1``,
    `KEEP_GLIBC_MALLOC`) into this process's. It serves every later forked cluster of the process
    with the environment it started with. So only a `musc` command's cluster is forked
    (`local_cluster_starting`): the command sets its environment before, and its one cluster
    serves all its runs. A Python caller's clusters are spawned, each seeing the environment
    (``HF_HOME``...) of its own start.
    """
    with dask.config.set(FORKSERVER):
        prepare_forkserver()
        yield


def prepare_forkserver() -> None:
    """Set what the forkserver imports; the first call imports what Dask's own preload names (pandas, lz4...).

    Call it in the thread that may be interrupted before a thread starts the cluster
    (`RunCluster.start_warm`): a Ctrl-C in the main thread during an import can leave that
    module's import lock held, and a starting thread importing the same module then waits
    for ever (a `musc score` hung so, its main thread joining the start's).
    """
    with dask.config.set(FORKSERVER):
        get_mp_context().set_forkserver_preload(["distributed", "musc_tasks.forkserver_preload"])


# Names the command's backbone and device to its forkserver, which loads it once for every worker
# (`load_shared_backbone`): JSON {"backbone": BackboneSpec's fields, "device": str}.
SHARED_BACKBONE_ENV = "MUSC_FORKSERVER_BACKBONE"


def start_forkserver(backbone: BackboneSpec | None = None, device: str = "auto") -> None:
    """Start the forkserver of the command's workers now, in the environment a nanny gives its workers.

    For a `musc` command that will start a local cluster, as soon as its options are checked
    and before it starts any thread (this briefly sets Dask's pre-spawn environment in
    ``os.environ``, as each nanny does for good). The forkserver's imports (about 4 s of a
    core here) then run beside the command's own imports and the Prefect server's start, where the
    second core was mostly idle, instead of after the cluster's start; the workers it forks
    later have the stages and the backbones' libraries imported. With ``backbone`` (the
    command's, on ``device``) it also loads the model once, on the CPU, for all of them.
    """
    prepare_forkserver()
    with dask.config.set(KEEP_GLIBC_MALLOC):  # read within: leaving the block restores the config's dict in place
        environ = dask.config.get("distributed.nanny.pre-spawn-environ")
        # as a nanny reads it: a value already in the environment wins, None sets nothing
        workers = {name: os.environ.get(name, str(value)) for name, value in environ.items() if value is not None}
    if workers.get("PYTHONHASHSEED") in (None, "0"):  # a nanny's one hash seed for its workers (dask/distributed#8400)
        workers["PYTHONHASHSEED"] = "6640"
    if backbone is not None:
        workers[SHARED_BACKBONE_ENV] = json.dumps({"backbone": backbone.model_dump(mode="json"), "device": device})
    before = {name: os.environ.get(name) for name in workers}
    os.environ.update(workers)
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        for name, value in before.items():
            if value is None:
                del os.environ[name]
            else:
                os.environ[name] = value


def load_shared_backbone() -> None:
    """In the forkserver: load the command's backbone (`SHARED_BACKBONE_ENV`) into `extract.worker_backbone`'s cache.

    A worker forked after it finds its model loaded (the weights' pages shared until written),
    where each worker loaded its own: 0.8 s of a core for ViT-B with random weights, a copy of
    ViT-L's 1.2 GB per worker from a checkpoint. Only on the CPU: a forked child cannot use CUDA
    once its parent initialised it, so "auto" counts only where it surely means the CPU
    (`auto_means_cpu`), and a GPU's workers load their own as before.
    """
    request = os.environ.pop(SHARED_BACKBONE_ENV, None)
    if request is None:
        return
    import ctypes.util

    import torch

    from .config import BackboneSpec
    from .extract import worker_backbone

    wanted = json.loads(request)
    device = wanted["device"]
    if device == "auto":  # the driver's library looked up, not loaded: nothing of CUDA starts here
        on_cpu = auto_means_cpu(torch.version.cuda, torch.version.hip, ctypes.util.find_library("cuda"))
    else:
        on_cpu = device == "cpu"
    if not on_cpu:
        return
    try:
        worker_backbone(BackboneSpec.model_validate(wanted["backbone"]), device)
    except Exception as error:  # missing weights...: each worker's first block loads again and reports it
        log.debug("the forkserver did not load the backbone; each worker will: %s", error)


def auto_means_cpu(cuda_build: str | None, rocm_build: str | None, cuda_driver: str | None) -> bool:
    """Whether ``--device auto`` resolves to the CPU, known without asking CUDA (which would initialise it).

    True for a torch built without CUDA and ROCm, and for a CUDA build (pip's default on x86_64)
    where NVIDIA's driver library is not installed: torch then finds no device. Anything else may
    have a GPU, and only CUDA itself could tell.

    Parameters
    ----------
    cuda_build, rocm_build : str or None
        ``torch.version.cuda`` and ``torch.version.hip``.
    cuda_driver : str or None
        The driver's library as ``ctypes.util.find_library("cuda")`` finds it, None when absent.
    """
    if cuda_build is None and rocm_build is None:
        return True
    return rocm_build is None and cuda_driver is None


LOCAL_WORKER_MEMORY = 6 * 2**30  # ViT-L weights, a block's activations and a pool task's blocks, with room


def local_worker_count() -> int:
    """Worker processes of the default local cluster: one per core, at most 8, each with LOCAL_WORKER_MEMORY."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return max(1, min(os.cpu_count() or 1, 8, memory // LOCAL_WORKER_MEMORY))

"""The run's local Dask cluster."""

import ctypes.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from musc_tasks.cluster import SHARED_BACKBONE_ENV, auto_means_cpu, dask_client, load_shared_backbone
from musc_tasks.extract import worker_backbone

from ..conftest import TINY_SPEC


def test_local_workers_keep_glibc_malloc_thresholds(monkeypatch):
    """Dask's default MALLOC_TRIM_THRESHOLD_ (page faults on every large tensor) does not reach the local workers."""
    monkeypatch.delenv("MALLOC_TRIM_THRESHOLD_", raising=False)  # an earlier cluster's nanny sets it in this process
    with dask_client(n_workers=1) as client:
        trim, threads = client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_"), client.run(os.getenv, "OMP_NUM_THREADS")
    assert list(trim.values()) == [None]
    assert list(threads.values()) == ["1"]  # Dask's other variables are kept: one thread per worker


def _sampling(dask_server):
    """Whether the server samples stacks for a dashboard's profile, and how often it checks its event loop."""
    return "profile" in getattr(dask_server, "periodic_callbacks", {}), dask_server._tick_interval


def test_local_servers_leave_out_the_dashboards_sampling():
    """No profile of the task threads (no dashboard shows it) and a loop check each second, not 50 times."""
    with dask_client(n_workers=1) as client:
        workers = list(client.run(lambda dask_worker: _sampling(dask_worker)).values())
        scheduler = client.run_on_scheduler(lambda dask_scheduler: _sampling(dask_scheduler)[1])
    assert workers == [(False, 1.0)]
    assert scheduler == 1.0


def _imported(*names):
    return [name for name in names if name in sys.modules]


def test_local_workers_import_the_stages_before_any_task():
    """In each worker's main thread as it starts, so no import of a task overlaps an unpickling (cpython#106905)."""
    stages = ("torch", "skimage.measure", "musc_tasks.extract", "musc_tasks.publish", "musc_tasks.scoring")
    with dask_client(n_workers=1) as client:
        imported = client.run(_imported, *stages)  # runs in the event loop: no task has run
    assert list(imported.values()) == [list(stages)]


def test_the_forkserver_ends_without_tearing_its_interpreter_down():
    """Its first exit handler ends the process: a teardown of torch would hold the command's output streams open."""
    script = "import atexit; atexit.register(print, 'torn down'); import musc_tasks.forkserver_preload"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stdout) == (0, ""), done.stderr[-2000:]


def test_the_workers_imports_leave_out_what_only_the_flows_process_uses():
    """Prefect and the report (matplotlib) are the flow's process's: 1.0-1.2 s of each worker start's core."""
    script = (
        "import sys; import musc_tasks.forkserver_preload; "
        "print(sorted({'prefect', 'matplotlib', 'musc_tasks.report'} & set(sys.modules)), "
        "all(m in sys.modules for m in ('torch', 'open_clip', 'musc_tasks.extract', 'musc_tasks.publish')), flush=True)"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "[] True", done.stdout + done.stderr[-2000:]


# This machine's answer to "does --device auto mean the CPU?", known without asking CUDA (CI: a
# CUDA build of torch and no NVIDIA driver, so True; the code before auto_means_cpu said False there).
AUTO_MEANS_CPU_HERE = auto_means_cpu(torch.version.cuda, torch.version.hip, ctypes.util.find_library("cuda"))


@pytest.mark.filterwarnings("ignore:.*RANDOM weights")
@pytest.mark.parametrize(
    ("device", "spec_update", "loaded"),
    [
        ("cpu", {}, True),
        ("auto", {}, AUTO_MEANS_CPU_HERE),
        ("cuda", {}, False),  # a forked child could not use CUDA after its parent initialised it
        ("cpu", {"pretrained": "/no/such/weights.pt"}, False),  # left to each worker's first block to report
    ],
)
def test_the_forkserver_loads_the_commands_backbone_once_on_the_cpu(monkeypatch, device, spec_update, loaded):
    spec = TINY_SPEC.model_copy(update=spec_update)
    request = json.dumps({"backbone": spec.model_dump(mode="json"), "device": device})
    monkeypatch.setenv(SHARED_BACKBONE_ENV, request)
    worker_backbone.cache_clear()
    try:
        load_shared_backbone()
        assert SHARED_BACKBONE_ENV not in os.environ  # not passed on to the workers it forks
        assert worker_backbone.cache_info().currsize == int(loaded)
        if loaded:  # what a worker's warm-up and blocks then ask for: found, not loaded again
            assert worker_backbone(TINY_SPEC, device).spec == TINY_SPEC
            assert worker_backbone.cache_info()[:2] == (1, 1)
    finally:
        worker_backbone.cache_clear()


@pytest.mark.parametrize(
    ("cuda_build", "rocm_build", "cuda_driver", "cpu"),
    [
        (None, None, None, True),  # a CPU build
        (None, None, "libcuda.so.1", True),  # a CPU build cannot use the driver
        ("12.8", None, None, True),  # pip's CUDA build without NVIDIA's driver: torch finds no device
        ("12.8", None, "libcuda.so.1", False),  # a driver: there may be a GPU, and only CUDA could tell
        (None, "6.4", None, False),  # ROCm finds its devices without NVIDIA's library
    ],
)
def test_auto_means_the_cpu_only_where_no_gpu_can_be_there(cuda_build, rocm_build, cuda_driver, cpu):
    assert auto_means_cpu(cuda_build, rocm_build, cuda_driver) is cpu

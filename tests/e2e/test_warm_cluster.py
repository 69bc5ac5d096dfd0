"""The run's local cluster starts early and warms its workers, but only for a night with images.

A flow starts it while the catalog runs; `musc score` as the command starts, and its flow takes it over.
"""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from datetime import date
from functools import partial
from pathlib import Path

import psutil
import pytest
from distributed import Client

import musc_tasks.cluster
from flows.score import score_captures
from musc_tasks import tables
from musc_tasks.cluster import run_cluster, start_local_cluster
from musc_tasks.config import BackboneSpec

from ..conftest import TINY_SPEC, backbone_options
from .conftest import subprocess_env
from .worker_probes import model_cache_after_a_block

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*RANDOM weights")]

REPO = Path(__file__).parents[2]


def _on_every_worker(cluster, spec: BackboneSpec) -> list:
    with Client(cluster.address(), set_as_default=False) as client:
        workers = list(client.scheduler_info()["workers"])
        futures = [client.submit(model_cache_after_a_block, spec, workers=[w], pure=False) for w in workers]
        return client.gather(futures)


def test_each_worker_has_the_model_before_the_first_block(tiny_backbone):
    with run_cluster(None, warm_for=tiny_backbone, device="cpu") as cluster:
        found = _on_every_worker(cluster, tiny_backbone)
    # each worker built the model once, in its warm-up task, and the block found it there
    assert found == [(1, 1)] * len(found) and len(found) >= 1


def test_a_failed_warm_up_leaves_the_first_block_its_own_error(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf-home"))  # the workers inherit both
    spec = BackboneSpec(name="ViT-B-16", pretrained="openai", image_size=224, layers=(1, 3))
    with run_cluster(None, warm_for=spec, device="cpu") as cluster:
        found = _on_every_worker(cluster, spec)
    expected = (
        "WeightsUnavailable: no weights for ViT-B-16 / openai in the local cache and the download source "
        "is unreachable (HF_HUB_OFFLINE is set)."
    )
    assert len(found) >= 1 and all(message.startswith(expected) for message in found), found


def test_runs_nested_in_a_shared_cluster_run_on_it_and_leave_it_open(tiny_backbone):
    """A backfill's days: the first one with images starts the one cluster warm, the block's end closes it."""
    with pytest.raises(KeyError), run_cluster(None, shared=True) as shared:
        for _ in range(2):
            with run_cluster(None, warm_for=tiny_backbone, device="cpu") as nested:
                assert nested is shared
                address = nested.address()
        with Client(address, set_as_default=False, timeout=10) as client:  # still open after the nested runs
            assert client.scheduler_info()["workers"]
        # each worker built the model once, in the one warm-up, and the block found it there
        found = _on_every_worker(shared, tiny_backbone)
        assert found == [(1, 1)] * len(found) and len(found) >= 1
        raise KeyError("a day failed")  # the block closes the cluster on the way out
    assert musc_tasks.cluster._shared is None
    with pytest.raises(OSError):
        Client(address, set_as_default=False, timeout=3)


@pytest.mark.parametrize("night", ["empty product folder", "no image file", "missing"])
def test_a_night_without_images_starts_no_cluster(night, prefect_api, tiny_backbone, tmp_path, monkeypatch):
    started = []

    def no_cluster(*args, **kwargs):
        started.append(night)
        raise RuntimeError("a night without images started a cluster")

    monkeypatch.setattr(musc_tasks.cluster, "start_local_cluster", no_cluster)
    if night != "missing":
        (tmp_path / "night" / "bolt").mkdir(parents=True)
    if night == "no image file":
        (tmp_path / "night" / "bolt" / "notes.txt").write_text("upload failed")
    state = score_captures(
        input_dir=str(tmp_path / "night"),
        out_dir=str(tmp_path / "out"),
        run_date=date(2026, 11, 22),
        backbone=tiny_backbone,
        device="cpu",
        return_state=True,
    )
    with pytest.raises(FileNotFoundError, match="does not exist" if night == "missing" else "no image in"):
        state.result()
    assert started == []
    if night != "missing":
        runs = tables.read_table(tmp_path / "out" / "tables" / "runs")
        assert list(runs["status"]) == ["no_input"]


def test_missing_weights_end_the_command_with_their_own_message(demo_day, prefect_api, tmp_path):
    """The warm-up fails first, quietly; the extraction's failure is what `musc score` reports."""
    env = subprocess_env(prefect_api)
    env.update(HF_HOME=str(tmp_path / "empty-hf-home"), PYTHONPATH=str(REPO))
    backbone = ["--backbone", "ViT-B-16", "--pretrained", "openai", "--image-size", "224", "--device", "cpu"]
    command = [sys.executable, "-m", "musc_tasks.cli", "score", str(demo_day.input_dir), "--out", str(tmp_path)]
    done = subprocess.run(
        [*command, *backbone, "--date", "2026-11-22"], env=env, capture_output=True, text=True, timeout=400
    )
    assert done.returncode == 2, done.stdout[-3000:] + done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("musc: error: no weights for ViT-B-16 / openai in the local cache"), done.stderr[-3000:]
    assert "HF_HUB_OFFLINE is set" in last and "warming" not in done.stderr.lower()  # not "warm": paths may hold it


STARTED = "starting the run's local Dask cluster with the command"


def _verbose_score(demo_day, out_dir, prefect_api, marker: str) -> tuple[list[str], dict[str, str]]:
    """`musc -v score` of the demo day with the tiny backbone; Dask's INFO records on; ``marker`` in its environment."""
    env = subprocess_env(prefect_api)
    # MUSC_RUN_MARKER: inherited by the run's worker processes, so the test can find any left behind
    env.update(PYTHONPATH=str(REPO), DASK_LOGGING__DISTRIBUTED="info", MUSC_RUN_MARKER=marker)
    command = [sys.executable, "-m", "musc_tasks.cli", "-v", "score", str(demo_day.input_dir), "--out", str(out_dir)]
    return [*command, "--date", "2026-11-22", *backbone_options(TINY_SPEC)], env


def _workers_left(marker: str, wait_s: float = 30.0) -> list[str]:
    """Command lines of live worker processes started under ``marker`` after an exited command, given ``wait_s`` to end.

    Spawned workers and, for a command's forked ones (`cluster.forked_workers`), the forkserver and
    its children, whose command line is the forkserver's: it ends once it sees its command gone.
    """
    deadline = time.monotonic() + wait_s
    while True:
        left = []
        for process in psutil.process_iter(["cmdline", "environ"]):
            cmdline = " ".join(process.info["cmdline"] or ())
            ours = (process.info["environ"] or {}).get("MUSC_RUN_MARKER") == marker
            if ours and ("spawn_main" in cmdline or "multiprocessing.forkserver" in cmdline):
                left.append(cmdline)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.5)


def _first(lines: list[str], text: str) -> int:
    return next(i for i, line in enumerate(lines) if text in line)


def _closed_before_the_traceback(lines: list[str]) -> bool:
    """The cluster was closed by the command, before its error's traceback, not by Dask's exit handler after it."""
    traceback = max(i for i, line in enumerate(lines) if line.startswith("Traceback"))
    dask_records = [i for i, line in enumerate(lines) if " distributed." in line]
    return any("Closing Nanny" in lines[i] for i in dask_records) and max(dask_records) < traceback


def test_the_command_starts_the_cluster_before_its_flow_and_the_flow_takes_it_over(demo_day, prefect_api, tmp_path):
    command, env = _verbose_score(demo_day, tmp_path / "out", prefect_api, marker=str(uuid.uuid4()))
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    begun = _first(lines, "Beginning flow run")
    assert _first(lines, STARTED) < begun < _first(lines, "the run uses the local Dask cluster its command started")
    # one scheduler in the whole command: the flow started no cluster of its own
    assert sum("Scheduler at:" in line for line in lines) == 1, done.stderr[-3000:]
    assert "still alive" not in done.stderr
    runs = tables.read_table(tmp_path / "out" / "tables" / "runs")
    assert list(runs["status"]) == ["completed"]


def test_the_demo_starts_its_cluster_with_the_command(prefect_api, tmp_path):
    env = subprocess_env(prefect_api)
    env.update(PYTHONPATH=str(REPO), DASK_LOGGING__DISTRIBUTED="info")
    command = [sys.executable, "-m", "musc_tasks.cli", "-v", "demo", "--bad-night", "--out", str(tmp_path / "out")]
    done = subprocess.run([*command, "--device", "cpu"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    begun = _first(lines, "Beginning flow run")
    assert _first(lines, STARTED) < begun < _first(lines, "the run uses the local Dask cluster its command started")
    assert sum("Scheduler at:" in line for line in lines) == 1, done.stderr[-3000:]
    runs = tables.read_table(tmp_path / "out" / "tables" / "runs")
    assert list(runs["status"]) == ["completed"]


def test_a_flow_failing_before_it_takes_the_cluster_over_closes_it_before_the_command_ends(
    demo_day, prefect_api, tmp_path
):
    (tmp_path / "a-file").write_text("")  # OUT below a file: the flow's run lock cannot create it
    marker = str(uuid.uuid4())
    command, env = _verbose_score(demo_day, tmp_path / "a-file" / "out", prefect_api, marker)
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 1 and "is not writable" in done.stderr, done.stderr[-3000:]
    lines = done.stderr.splitlines()
    assert _first(lines, STARTED) < _first(lines, "Beginning flow run")
    assert _closed_before_the_traceback(lines), done.stderr[-3000:]
    assert "still alive" not in done.stderr
    assert _workers_left(marker) == []


def test_ctrl_c_during_the_start_closes_the_cluster(demo_day, prefect_api, tmp_path):
    marker = str(uuid.uuid4())
    command, env = _verbose_score(demo_day, tmp_path / "out", prefect_api, marker)
    # SIGINT as a terminal sends it, even where this test runs with it ignored (a background job)
    restore = partial(signal.signal, signal.SIGINT, signal.SIG_DFL)
    process = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, preexec_fn=restore
    )
    seen = []
    for line in process.stderr:  # Ctrl-C as soon as the cluster is starting
        seen.append(line)
        if STARTED in line:
            process.send_signal(signal.SIGINT)
            break
    stderr = "".join(seen) + process.stderr.read()
    process.wait(timeout=60)
    assert process.returncode != 0 and "KeyboardInterrupt" in stderr, stderr[-3000:]
    assert _closed_before_the_traceback(stderr.splitlines()), stderr[-3000:]
    assert "still alive" not in stderr
    assert _workers_left(marker) == []


def test_a_local_cluster_serves_http_on_a_free_port_without_a_warning():
    with socket.socket() as held:
        with contextlib.suppress(OSError):  # another cluster may hold it already: as good
            held.bind(("127.0.0.1", 8787))
            held.listen()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            cluster = start_local_cluster(1)
            try:
                port = cluster.scheduler.http_server.port
            finally:
                cluster.close()
    assert port != 8787 and not [w for w in caught if "already in use" in str(w.message)]


@pytest.mark.parametrize("forkserver", ["started by the first worker", "started early"])
def test_the_commands_workers_fork_from_one_import_and_the_command_keeps_its_torch_threads(tiny_backbone, forkserver):
    """Forked from the forkserver in their environment; the nannies' OMP_NUM_THREADS=1 stays out of this torch.

    The forkserver's environment is the one its process started with (/proc's, which the forked
    workers share): glibc read MALLOC_TRIM_THRESHOLD_ from it, torch OMP_NUM_THREADS. Started
    early with the command's backbone, the forkserver loads the model once: each worker's
    warm-up then finds it in its model cache (a hit, no load of its own).
    """
    started = (
        "import json, os, sys\n"
        "import psutil\n"
        "from distributed import Client\n"
        "import musc_tasks.cluster as c\n"
        "from musc_tasks.config import BackboneSpec\n"
        "def worker_facts():  # a worker's parent, torch threads, starting environment, imports before any task\n"
        "    import torch\n"
        "    stages = ('musc_tasks.extract', 'musc_tasks.scoring', 'musc_tasks.forkserver_preload', 'open_clip')\n"
        "    parent = ' '.join(psutil.Process(os.getppid()).cmdline())\n"
        "    started_with = psutil.Process().environ()\n"
        "    names = ('MALLOC_TRIM_THRESHOLD_', 'OMP_NUM_THREADS')\n"
        "    imported = [name for name in stages if name in sys.modules]\n"
        "    from musc_tasks.extract import worker_backbone\n"
        "    cache = worker_backbone.cache_info()\n"
        "    loads = [cache.misses, cache.hits]  # after the warm-up's call\n"
        "    return [parent, torch.get_num_threads(), [started_with.get(name) for name in names], imported, loads]\n"
        "if sys.argv[2] == 'started early':\n"
        "    c.start_forkserver(BackboneSpec.model_validate_json(sys.argv[1]), 'cpu')\n"
        "with c.local_cluster_starting(BackboneSpec.model_validate_json(sys.argv[1]), 'cpu'):\n"
        "    address = c._started_by_command.address()  # the nannies have started their workers\n"
        "    c._started_by_command._client.gather(c._started_by_command._warming)  # and warmed them\n"
        "    import torch  # as the command's flows import it\n"
        "    print(torch.get_num_threads())\n"
        "    with Client(address, set_as_default=False) as client:\n"
        "        print(json.dumps(list(client.run(worker_facts).values())))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    for set_by_a_nanny_of_this_process in ("OMP_NUM_THREADS", "MALLOC_TRIM_THRESHOLD_"):
        env.pop(set_by_a_nanny_of_this_process, None)
    plain = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.get_num_threads())"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    done = subprocess.run(
        [sys.executable, "-c", started, tiny_backbone.model_dump_json(), forkserver],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    threads, facts = done.stdout.splitlines()
    assert threads.split() == plain.stdout.split()
    facts = json.loads(facts)
    assert len(facts) >= 1 and all("multiprocessing.forkserver" in parent for parent, *_ in facts), facts
    stages = ["musc_tasks.extract", "musc_tasks.scoring", "musc_tasks.forkserver_preload", "open_clip"]
    # the model: loaded once in the forkserver (the warm-up a cache hit), else once by each worker
    loads = [1, 1] if forkserver == "started early" else [1, 0]
    assert [rest for _, *rest in facts] == [[1, [None, "1"], stages, loads]] * len(facts)

"""Faults on real processes: an unreachable scheduler, a full results disk, a lost Prefect server.

The reference is an undisturbed run on the default LocalCluster (`local_cli_run`); the faulted
runs and their re-runs use the session's cluster and wait for its tasks to drain after a failure
(killed workers on a shell-started cluster: tests/e2e/test_dask_external.py).
"""

import os
import re
import shutil
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from musc_tasks import tables
from musc_tasks.cluster import CONNECT_TIMEOUT_S

from ..tmpfs import small_tmpfs
from .conftest import score, score_command, subprocess_env
from .processes import background, free_port, stop_group, tail, wait_for, wait_until_idle

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent


def test_an_unreachable_scheduler_stops_the_run_within_seconds(demo_day, prefect_api, tmp_path):
    address = f"tcp://127.0.0.1:{free_port()}"  # nobody listens there
    done = score(demo_day, tmp_path / "out", prefect_api, address)
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-3000:]
    # Bounded by the client's connect timeout, not Dask's 30 s default; the seconds are measured
    # in docs/performance.md, not asserted.
    message = f"Dask scheduler at {address} did not answer within {CONNECT_TIMEOUT_S} s"
    assert message in done.stderr, done.stderr[-3000:]
    assert not list((tmp_path / "out").rglob("*.zarr")), "no work may start without the cluster"


def files_under(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def scores_in(out: Path, columns: list[str]):
    """The scores table's columns, mask and heatmap paths relative to ``out`` (they are absolute)."""
    frame = tables.read_table(out / "tables" / "scores")[columns]
    for column in ("mask_path", "heatmap_path"):
        frame[column] = frame[column].str.removeprefix(f"{out}/")
    return frame


def test_a_full_results_disk_fails_in_one_line_and_a_rerun_completes_identically(
    demo_day, prefect_api, dask_address, local_cli_run, tmp_path
):
    out = tmp_path / "out"
    # Extraction and scoring were done on a roomy disk (copied from the reference run, to keep
    # the test cheap); the heatmaps folder is a 64 KiB file system, far less than the night's
    # heatmaps need, so publish hits ENOSPC in a Dask worker (the session's cluster: its workers
    # have imported torch already).
    for store in ("tokens", "pools"):
        shutil.copytree(local_cli_run / "cache" / store, out / "cache" / store)
    columns = ["path", "raw_score", "score", "rank", "mask_path", "heatmap_path"]
    with small_tmpfs(out / "heatmaps", "64k"):
        full = score(demo_day, out, prefect_api, dask_address)
        assert full.returncode == 2, full.stdout[-3000:] + full.stderr[-3000:]
        wait_until_idle(dask_address)  # publish tasks already running finish after the failed run
        errors = [line for line in full.stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1, full.stderr[-5000:]
        assert re.fullmatch(
            rf"musc: error: disk full: writing {re.escape(str(out / 'heatmaps'))}/\S+ needs about [\d.]+ \S+,"
            r" [\d.]+ \S+ free there; free space and run again \(finished work is kept\)",
            errors[0],
        ), errors[0]
        assert "Traceback" not in full.stderr, full.stderr[-5000:]
        # nothing half-written: no temp file left, every visible file is the finished one
        left = [p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith((".partial", ".old"))]
        assert not left, left
        heatmaps = files_under(out / "heatmaps")
        assert heatmaps, "some heatmaps fit before the disk was full"
    reference = files_under(local_cli_run / "heatmaps")
    assert all(reference[name] == data for name, data in heatmaps.items())
    reference_masks = files_under(local_cli_run / "masks")
    assert all(reference_masks[name] == data for name, data in files_under(out / "masks").items())
    if (out / "tables" / "scores").exists():  # products published before the disk filled are complete
        partial = scores_in(out, columns).sort_values("path")
        expected = scores_in(local_cli_run, columns)
        assert partial.reset_index(drop=True).equals(
            expected[expected["path"].isin(partial["path"])].sort_values("path").reset_index(drop=True)
        )
    assert not (out / "tables" / "runs").exists(), "the run is not recorded as finished"

    # space freed (the tmpfs is gone): the same command completes, from the stores, identically
    again = score(demo_day, out, prefect_api, dask_address)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "tokens extracted 0 (cached 30); block pairs computed 0" in again.stdout, again.stdout
    rerun = scores_in(out, columns).sort_values("path").reset_index(drop=True)
    expected = scores_in(local_cli_run, columns).sort_values("path")
    assert rerun.equals(expected.reset_index(drop=True))
    assert files_under(out / "heatmaps") == reference
    assert files_under(out / "masks") == reference_masks
    assert files_under(out / "crops") == files_under(local_cli_run / "crops")


def test_local_workers_exit_when_the_run_ends_without_being_killed(local_cli_run):
    # a worker process that imported torch used to outlive the nanny's 4 s wait at teardown
    stderr = (local_cli_run.parent / "stderr.txt").read_text()
    assert "still alive after" not in stderr, stderr[-3000:]


def test_a_run_logged_to_a_file_shows_its_progress_in_short_lines(local_cli_run, demo_day):
    # stderr was a pipe, as in a night's log file: no bar's carriage returns, a line per quarter done
    stderr = (local_cli_run.parent / "stderr.txt").read_text()
    assert "\r" not in stderr and "\x1b[" not in stderr, stderr[-3000:]
    done = {line.split(" (100 %)")[0] for line in stderr.splitlines() if " (100 %) after " in line}
    products = sorted({image.product for image in demo_day.images})
    assert {f"tokens {product}: 10/10" for product in products} <= done, stderr[-3000:]
    assert any(line.startswith("mutual scoring: ") for line in done), stderr[-3000:]


@contextmanager
def prefect_server(home: Path, port: int, log: Path):
    """`prefect server start` on ``port`` with its database in ``home``, until the block ends."""
    env = dict(
        os.environ,
        PREFECT_HOME=str(home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        DO_NOT_TRACK="1",
    )
    env.pop("PREFECT_API_URL", None)
    command = [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(command, env, log) as process:

        def healthy():
            assert process.poll() is None, f"prefect server exited with {process.returncode}\n{tail(log)}"
            return httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=5).status_code == 200

        wait_for("the Prefect server", healthy, timeout=180, logs=[log])
        yield process


def test_a_prefect_server_lost_mid_run_fails_it_clearly_and_a_rerun_after_its_restart_resumes(
    demo_day, dask_address, local_cli_run, tmp_path
):
    home, port, log = tmp_path / "prefect-home", free_port(), tmp_path / "server.log"
    home.mkdir()
    api = f"http://127.0.0.1:{port}/api"
    out = tmp_path / "out"
    for store in ("tokens", "pools"):  # extraction and scoring done (copied, to keep the test cheap)
        shutil.copytree(local_cli_run / "cache" / store, out / "cache" / store)
    pauses = tmp_path / "pauses"
    pauses.mkdir()
    # Paused after publishing the first product's tables; the client retries a lost server once
    # (the default, 5 times over about a minute, only makes the test slower)
    paused = dict(
        subprocess_env(api), MUSC_PAUSE_AT="publish-product", MUSC_PAUSE_DIR=str(pauses), PREFECT_CLIENT_MAX_RETRIES="1"
    )
    with open(tmp_path / "run.out", "w") as stdout, open(tmp_path / "run.err", "w") as stderr:
        with prefect_server(home, port, log):
            run = subprocess.Popen(
                score_command(demo_day, out, dask_address),
                env=paused,
                stdout=stdout,
                stderr=stderr,
                start_new_session=True,
            )
            try:
                wait_for("the run to pause", (pauses / "publish-product.paused").exists, 600, [tmp_path / "run.err"])
            except BaseException:
                stop_group(run)
                raise
        (pauses / "publish-product.go").touch()  # the server is gone (SIGTERM, then SIGKILL after 15 s)
        try:
            assert run.wait(timeout=300) == 2, tail(tmp_path / "run.err")
        finally:
            stop_group(run)
    # Prefect's own notices of the lost server (its log and event senders) may come too, no traceback
    lost = (tmp_path / "run.err").read_text()
    errors = [line for line in lost.splitlines() if line.startswith("musc: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"musc: error: lost the Prefect server at {api}"), lost[-3000:]
    assert "Traceback" not in lost, lost[-5000:]

    wait_until_idle(dask_address)  # the lost run's publish tasks finish on the shared cluster
    with prefect_server(home, port, log):  # restarted on the same port and database
        again = score(demo_day, out, api, dask_address)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        runs = httpx.post(f"{api}/flow_runs/filter", json={"sort": "START_TIME_ASC"}, timeout=30).json()
    assert "tokens extracted 0 (cached 30); block pairs computed 0" in again.stdout, again.stdout
    columns = ["path", "raw_score", "score", "rank", "mask_path", "heatmap_path"]
    rerun = scores_in(out, columns).sort_values("path").reset_index(drop=True)
    expected = scores_in(local_cli_run, columns).sort_values("path")
    assert rerun.equals(expected.reset_index(drop=True))
    assert files_under(out / "heatmaps") == files_under(local_cli_run / "heatmaps")
    # the server never heard how the first run ended; the re-run is a new flow run that completed
    assert [r["state_type"] for r in runs] == ["RUNNING", "COMPLETED"], [(r["name"], r["state_type"]) for r in runs]

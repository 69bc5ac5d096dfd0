"""prefect.yaml for real: a Prefect server, a process work pool, `prefect deploy`, a worker.

Everything runs as it would at a site, each piece its own process: `prefect server start`
on a free port with a temporary PREFECT_HOME, `prefect work-pool create --type process`,
`deployments/deploy.sh -n nightly-score` (i.e. `prefect deploy --no-prompt` with the site's
environment), `prefect deployment run` of the nightly deployment for a demo day, and
`prefect worker start`. The scores Parquet of "yesterday" must then exist, and the server's
scheduler must have queued the next nights at 02:00 in the site's time zone.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from datetime import date, datetime, timedelta
from datetime import time as clock
from pathlib import Path
from zoneinfo import ZoneInfo

import duckdb
import httpx
import pytest

from ..conftest import TINY_CONFIG
from .processes import REPO, background, free_port, tail, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

BIN = Path(sys.executable).parent
PREFECT = BIN / "prefect"
DEPLOY_SH = REPO / "deployments" / "deploy.sh"

DEMO_DAY = date(2026, 11, 21)
POOL = "musc-e2e"
TIMEZONE = "Europe/Berlin"
N_PER_PRODUCT = 6
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def base_env(prefect_home: Path) -> dict[str, str]:
    """This process's environment without any Prefect setting of the user's, made offline."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and not k.startswith("MUSC_")}
    env.update(
        PREFECT_HOME=str(prefect_home),
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_UI_ENABLED="false",
        DO_NOT_TRACK="1",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        HF_HUB_OFFLINE="1",
        PATH=os.pathsep.join([str(BIN), env.get("PATH", "")]),
    )
    return env


def cli(args: list[str], env: dict[str, str], logs: list[Path], timeout: float = 180) -> str:
    done = subprocess.run(
        args, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    output = done.stdout + done.stderr
    if done.returncode != 0:
        pytest.fail(
            f"{' '.join(map(str, args))} exited {done.returncode}:\n{output[-6000:]}\n"
            + "\n".join(tail(log) for log in logs)
        )
    return output


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """A Prefect server on a free port; yields (api_url, client_env, server_log)."""
    tmp = tmp_path_factory.mktemp("prefect")
    home = tmp / "prefect-home"
    home.mkdir()
    # The scheduler queues a new deployment's runs within a few seconds.
    server_env = dict(base_env(home), PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS="5")
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    server_log = tmp / "server.log"
    command = [str(PREFECT), "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    with background(command, server_env, server_log) as process:

        def healthy():
            if process.poll() is not None:
                pytest.fail(f"prefect server exited with {process.returncode}\n{tail(server_log)}")
            return httpx.get(f"{api_url}/health", timeout=5).status_code == 200

        wait_for("the Prefect server's /api/health", healthy, timeout=180, logs=[server_log])
        client_env = dict(base_env(home), PREFECT_API_URL=api_url, PREFECT_WORKER_QUERY_SECONDS="2")
        yield api_url, client_env, server_log


@pytest.fixture(scope="module")
def site(server, tmp_path_factory):
    """A site's captures folders, a process work pool, and nightly-score deployed into it."""
    from musc_tasks.demo import make_demo_day

    api_url, env, server_log = server
    tmp = tmp_path_factory.mktemp("site")
    captures, results = tmp / "captures", tmp / "results"
    # A folder per day, as a site would have them; DEMO_DAY is "last night's" day.
    day = make_demo_day(
        captures / DEMO_DAY.isoformat(), seed=0, images_per_product=N_PER_PRODUCT, defects_per_product=1, size=112
    )
    cli([str(PREFECT), "work-pool", "create", POOL, "--type", "process"], env, [server_log])
    # MUSC_DASK_ADDRESS, MUSC_DEVICE, MUSC_PROJECT_DIR, MUSC_NIGHTLY_CRON: deploy.sh's defaults.
    site_env = dict(
        env,
        PREFECT_BIN=str(PREFECT),
        MUSC_SITE_ENV=str(tmp / "no-site.env"),
        MUSC_WORK_POOL=POOL,
        MUSC_INPUT_PATTERN=str(captures / "{date}" / "input"),
        MUSC_RESULTS_DIR=str(results),
        MUSC_TIMEZONE=TIMEZONE,
    )
    cli(["bash", str(DEPLOY_SH), "-n", "nightly-score"], site_env, [server_log])
    with httpx.Client(base_url=api_url, timeout=30) as api:
        deployment = api.get("/deployments/name/score-captures/nightly-score").raise_for_status().json()
    return dict(
        api_url=api_url,
        env=env,
        server_log=server_log,
        tmp=tmp,
        day=day,
        results=results,
        input_pattern=site_env["MUSC_INPUT_PATTERN"],
        deployment=deployment,
    )


def test_nightly_deployment_settings(site):
    deployment = site["deployment"]
    params = deployment["parameters"]
    assert params["input_dir"] == site["input_pattern"] and params["out_dir"] == str(site["results"])
    assert params["day_offset"] == -1 and params["dask_address"] == "" and params["device"] == "auto"
    # references: unset at the site, so zero-shot ("" is none); the mode a choice in the UI's form
    assert params["references"] == "" and params["reference_mode"] == "combined"
    schema = deployment["parameter_openapi_schema"]["properties"]
    assert schema["references"]["default"] is None
    assert schema["reference_mode"]["default"] == "combined"
    assert schema["reference_mode"]["enum"] == ["few-shot", "plus", "combined"]
    assert deployment["work_pool_name"] == POOL
    [schedule] = [s["schedule"] for s in deployment["schedules"]]
    assert schedule["cron"] == "0 2 * * *" and schedule["timezone"] == TIMEZONE
    limit = deployment.get("concurrency_limit")
    if limit is None and deployment.get("global_concurrency_limit"):
        limit = deployment["global_concurrency_limit"]["limit"]
    assert limit == 1
    assert deployment["job_variables"]["env"]["TZ"] == TIMEZONE
    # nothing phones home from a flow run
    assert deployment["job_variables"]["env"]["DO_NOT_TRACK"] == "1"
    assert deployment["job_variables"]["env"]["PREFECT_SERVER_ANALYTICS_ENABLED"] == "false"
    assert deployment["pull_steps"] == [{"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}]
    everything = json.dumps([params, deployment["job_variables"], deployment["pull_steps"]])
    assert "{{" not in everything, f"an environment variable was not templated: {everything}"


def test_nightly_run_scores_yesterday(site):
    api_url, env, server_log, tmp = site["api_url"], site["env"], site["server_log"], site["tmp"]
    worker_log = tmp / "worker.log"
    logs = [server_log, worker_log]
    products = sorted({image.product for image in site["day"].images})

    # "Last night's" run for DEMO_DAY + 1, with the tiny random backbone on the CPU.
    overrides = {
        "run_date": (DEMO_DAY + timedelta(days=1)).isoformat(),
        "device": "cpu",
        "backbone": {
            "name": "musc-tiny-vit",
            "pretrained": None,
            "image_size": 112,
            "layers": [1, 3],
            "model_config_path": str(TINY_CONFIG),
        },
        "scoring": {"task_images": 3},
    }
    output = cli(
        [str(PREFECT), "deployment", "run", "score-captures/nightly-score", "--params", json.dumps(overrides)],
        env,
        logs,
    )
    found = re.search(r"UUID:\s*([0-9a-f-]{36})", output)
    assert found, f"no flow run id in `prefect deployment run` output:\n{output}"
    flow_run_id = found.group(1)

    with httpx.Client(base_url=api_url, timeout=30) as api:
        worker_command = [str(PREFECT), "worker", "start", "--pool", POOL, "--limit", "1"]
        with background(worker_command, env, worker_log) as worker:

            def finished():
                if worker.poll() is not None:
                    pytest.fail(f"the worker exited with {worker.returncode}\n{tail(worker_log, 150)}")
                state = api.get(f"/flow_runs/{flow_run_id}").raise_for_status().json()["state"]
                return state if state and state["type"] in TERMINAL else None

            state = wait_for(f"flow run {flow_run_id} to finish", finished, timeout=240, logs=logs, interval=2)
        if state["type"] != "COMPLETED":
            records = api.post(
                "/logs/filter", json={"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_ASC"}
            ).json()
            messages = "\n".join(record["message"] for record in records)[-8000:]
            pytest.fail(
                f"flow run ended {state['type']}: {state.get('message')}\n--- flow run logs ---\n{messages}\n"
                + tail(worker_log, 150)
            )
        artifacts = (
            api.post(
                "/artifacts/filter",
                json={"artifacts": {"flow_run_id": {"any_": [flow_run_id]}, "key": {"any_": ["score-summary"]}}},
            )
            .raise_for_status()
            .json()
        )
    assert artifacts, "the run published no score-summary artifact"

    results = site["results"]
    partition = results / "tables" / "scores" / f"date={DEMO_DAY.isoformat()}"
    files = sorted(partition.glob("product=*/*.parquet"))
    assert files, (
        f"no Parquet under {partition}: {sorted(str(p.relative_to(results)) for p in results.rglob('*'))[:40]}"
    )
    rows = duckdb.sql(
        f"select product, status, count(*) n from read_parquet('{partition}/*/*.parquet', hive_partitioning=true)"
        " group by all order by product"
    ).fetchall()
    assert rows == [(product, "scored", N_PER_PRODUCT) for product in products]


def test_scheduler_queues_the_next_nights(site):
    """The server's scheduler must turn the cron schedule into runs at 02:00 site time.

    (With SQLAlchemy 2.1 the Prefect 3.8.8 server's scheduler fails on every insert, logging
    "Can't evaluate bulk DML statement" in server.log, and no nightly run is ever created.)
    """
    deployment_id = site["deployment"]["id"]
    query = {
        "flow_runs": {"deployment_id": {"any_": [deployment_id]}, "state": {"type": {"any_": ["SCHEDULED"]}}},
        "sort": "EXPECTED_START_TIME_ASC",
        "limit": 3,
    }

    server_log = site["server_log"]
    known = "Can't evaluate bulk DML statement"

    def scheduled():
        runs = httpx.post(f"{site['api_url']}/flow_runs/filter", json=query, timeout=30).raise_for_status().json()
        if not runs and known in server_log.read_text(errors="replace"):
            pytest.fail(
                f"the server's scheduler failed with {known!r}: the Prefect 3.8.8 server cannot insert "
                "scheduled runs with SQLAlchemy 2.1 (pin sqlalchemy<2.1); no nightly run would ever start\n"
                + tail(server_log, 40)
            )
        return runs

    runs = wait_for("the scheduler to queue nightly-score runs", scheduled, timeout=60, logs=[server_log])
    zone = ZoneInfo(TIMEZONE)
    starts = [datetime.fromisoformat(run["expected_start_time"]).astimezone(zone) for run in runs]
    assert all(start.time() == clock(2, 0) for start in starts), starts
    assert all(run["auto_scheduled"] and run["parameters"]["day_offset"] == -1 for run in runs)

"""Runs sharing one results folder: other dates go ahead together, the same date waits."""

import subprocess
import sys
import threading
import time

import pytest

from musc_tasks import tables
from musc_tasks.config import ScoringParams
from musc_tasks.locks import run_lock

from .conftest import subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*RANDOM weights")]

RUN = """
import sys
from datetime import date
from flows.score import score_captures
from musc_tasks.config import BackboneSpec, ScoringParams
score_captures(input_dir=sys.argv[1], out_dir=sys.argv[2], run_date=date.fromisoformat(sys.argv[3]),
               backbone=BackboneSpec.model_validate_json(sys.argv[4]),
               scoring=ScoringParams.model_validate_json(sys.argv[5]), device="cpu", dask_address=sys.argv[6])
"""


def start(day, demo_day, out, backbone, dask_address, api):
    command = [
        sys.executable,
        "-c",
        RUN,
        str(demo_day.input_dir),
        str(out),
        day,
        backbone.model_dump_json(),
        ScoringParams(task_images=4).model_dump_json(),
        dask_address,
    ]
    return subprocess.Popen(
        command, env=subprocess_env(api), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def test_two_dates_at_once_both_succeed(prefect_api, dask_address, demo_day, tiny_backbone, tmp_path):
    runs = [
        start(day, demo_day, tmp_path, tiny_backbone, dask_address, prefect_api) for day in ("2026-11-01", "2026-11-02")
    ]
    outputs = [run.communicate(timeout=300)[0] for run in runs]
    assert [run.returncode for run in runs] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    scores = tables.read_table(tmp_path / "tables" / "scores")
    assert scores.groupby(scores["date"].dt.strftime("%Y-%m-%d")).size().to_dict() == {  # date is a real date
        "2026-11-01": len(demo_day.images),
        "2026-11-02": len(demo_day.images),
    }


def test_same_date_and_backbone_waits_for_the_running_one(prefect_api, dask_address, demo_day, tiny_backbone, tmp_path):
    lines: list[str] = []
    said_waiting = threading.Event()

    def read(stream):
        for line in stream:
            lines.append(line)
            if "waiting for it to finish" in line:
                said_waiting.set()

    with run_lock(tmp_path, "2026-11-03", tiny_backbone.key):  # a run of that date is in progress
        waiting = start("2026-11-03", demo_day, tmp_path, tiny_backbone, dask_address, prefect_api)
        reader = threading.Thread(target=read, args=(waiting.stdout,), daemon=True)
        reader.start()
        # Start-up (imports, the flow run) takes from seconds to a minute on a loaded machine:
        # wait for the run to say it waits, not for a fixed time.
        assert said_waiting.wait(timeout=240), "".join(lines)[-3000:]
        time.sleep(2)
        assert waiting.poll() is None, "the second run did not wait"
        assert not (tmp_path / "tables").exists(), "the second run wrote while the first held the lock"
    waiting.wait(timeout=300)
    reader.join(timeout=30)
    assert waiting.returncode == 0, "".join(lines)[-3000:]
    assert len(tables.read_table(tmp_path / "tables" / "scores")) == len(demo_day.images)

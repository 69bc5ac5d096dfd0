"""Two days scored with backbone A, re-scored with backbone B; both coexist; compare reports.

A backfill on the local cluster starts one for the whole range, and its days equal each day scored alone.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

import musc_tasks.cluster
from flows.backfill import _already_scored
from musc_tasks import tables
from musc_tasks.cli import backbone_from_args, build_parser, main, scoring_from_args
from musc_tasks.references import list_reference_sets

from ..conftest import TINY_CONFIG, TINY_CONFIG_B
from .conftest import subprocess_env
from .test_score_flow import comparable
from .test_warm_cluster import STARTED, _first

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*RANDOM weights")]
COMMON = ["--pretrained", "none", "--image-size", "224", "--device", "cpu", "--pool-size", "200"]
BACKBONE_A = ["--backbone", "musc-tiny-vit", "--model-config", str(TINY_CONFIG), "--layers", "1,3", *COMMON]
BACKBONE_B = ["--backbone", "musc-tiny-vit-b", "--model-config", str(TINY_CONFIG_B), "--layers", "2,5", *COMMON]
DAYS = ("2026-11-20", "2026-11-21")


@pytest.fixture(scope="module")
def two_days(demo_day, tmp_path_factory):
    root = tmp_path_factory.mktemp("captures")
    for offset, day in enumerate(DAYS):
        for image in demo_day.images[offset::2]:  # a different half of the demo each day
            target = root / day / image.product / image.path.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(image.path, target)
    return root


def test_backfill_with_another_backbone_coexists_and_compares(
    prefect_api, dask_address, demo_day, two_days, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    on_cluster = ["--dask-address", dask_address]  # the session's cluster: no LocalCluster per run
    for day in DAYS:
        assert main(["score", str(two_days / day), "--out", str(out), "--date", day, *BACKBONE_A, *on_cluster]) == 0
    pattern = str(two_days / "{date}")
    backfill_b = ["backfill", "--from", DAYS[0], "--to", DAYS[1], "--input-root", pattern, "--out", str(out)]
    backfill_b += [*BACKBONE_B, *on_cluster]
    assert main(backfill_b) == 0

    scores = tables.read_table(out / "tables" / "scores")
    keys = sorted(scores["backbone_key"].unique())
    assert len(keys) == 2
    for day in DAYS:
        per_backbone = scores[scores["date"] == day].groupby("backbone_key")["path"].apply(sorted)
        assert per_backbone.iloc[0] == per_backbone.iloc[1], "both backbones score the same files"
    for key in keys:  # each backbone's masks live in their own folder
        assert list((out / "masks" / DAYS[0]).rglob(f"{key}/*.png"))
    assert scores.groupby(["date", "backbone_key", "path"]).size().max() == 1

    runs_before = len(tables.read_table(out / "tables" / "runs"))
    capsys.readouterr()
    assert main(backfill_b) == 0
    assert capsys.readouterr().out.count("already scored with this backbone") == 2
    assert len(tables.read_table(out / "tables" / "runs")) == runs_before

    assert main(["compare", "--out", str(out), "--date", DAYS[0], "--backbones", "musc-tiny-vit_,musc-tiny-vit-b"]) == 0
    report = capsys.readouterr().out
    assert "spearman" in report and "changed flag" in report
    for product in scores["product"].unique():
        assert product in report

    # Re-scoring a day with known-good references: not "already scored" (those rows are zero-shot),
    # and the rows then record the set's version, so the re-score is reproducible.
    golden = tmp_path / "golden"
    for image in demo_day.images[1::2]:  # the other day's half: not the night's own images
        if not image.is_defective:
            (golden / image.product).mkdir(parents=True, exist_ok=True)
            shutil.copy(image.path, golden / image.product / image.path.name)
    with_references = [*BACKBONE_B, *on_cluster, "--references", str(golden), "--reference-mode", "plus"]
    one_day = ["backfill", "--from", DAYS[0], "--to", DAYS[0], "--input-root", pattern, "--out", str(out)]
    parsed = build_parser().parse_args([*one_day, *with_references])
    key_b = backbone_from_args(parsed).key
    capsys.readouterr()
    assert main([*one_day, *with_references]) == 0
    assert "scored" in capsys.readouterr().out
    scores = tables.read_table(out / "tables" / "scores")
    rescored = scores[(scores["date"] == DAYS[0]) & (scores["backbone_key"] == key_b)]
    assert set(rescored["reference_mode"]) == {"plus"}
    labels = {stored.product: stored.label for stored in list_reference_sets(out, backbone_key=key_b)}
    assert sorted(labels) == sorted(rescored["product"].unique())
    assert all(rescored["reference_set"] == rescored["product"].map(labels))
    assert main([*one_day, *with_references]) == 0
    assert "already scored with this backbone and these references" in capsys.readouterr().out
    # another mode, or zero-shot again, is not the same scoring: those would re-score the day
    args = (out, DAYS[0], backbone_from_args(parsed), scoring_from_args(parsed), str(two_days / DAYS[0]))
    assert _already_scored(*args, str(golden), "plus")
    assert not _already_scored(*args, str(golden), "combined")
    assert not _already_scored(*args, None)
    # a relative --input-root names the same folders: the days it scored are done
    monkeypatch.chdir(two_days)
    assert _already_scored(*args[:4], DAYS[0], str(golden), "plus")


def test_a_backfill_scores_its_days_on_one_local_cluster_as_each_day_alone(
    prefect_api, dask_address, two_days, tmp_path, monkeypatch, capsys
):
    """`musc backfill` without --dask-address: one LocalCluster, started with the command, for every day."""
    out, alone = tmp_path / "backfill", tmp_path / "alone"
    env = subprocess_env(prefect_api)
    env.update(PYTHONPATH=str(Path(__file__).parents[2]), DASK_LOGGING__DISTRIBUTED="info")  # the scheduler's records
    backfill = ["backfill", "--from", DAYS[0], "--to", DAYS[1], "--input-root", str(two_days / "{date}")]
    command = [sys.executable, "-m", "musc_tasks.cli", "-v", *backfill, "--out", str(out), *BACKBONE_A]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert done.stdout.count(", flagged ") == len(DAYS), done.stdout
    lines = done.stderr.splitlines()
    # every LocalCluster's scheduler logs its address as it starts: one for the whole range
    assert sum("Scheduler at:" in line for line in lines) == 1, done.stderr[-3000:]
    assert _first(lines, STARTED) < _first(lines, "Beginning flow run")
    assert sum("the run uses the local Dask cluster of the run it is nested in" in line for line in lines) == len(DAYS)
    assert "still alive" not in done.stderr

    for day in DAYS:  # each day on its own, on another cluster
        score = ["score", str(two_days / day), "--out", str(alone), "--date", day, *BACKBONE_A]
        assert main([*score, "--dask-address", dask_address]) == 0
    for table in ("scores", "regions"):
        pd.testing.assert_frame_equal(comparable(out, table), comparable(alone, table))
    assert sorted(tables.read_table(out / "tables" / "scores")["date"].astype(str).unique()) == list(DAYS)

    # Run again: every day is done, so neither the command nor the flow starts a cluster.
    started = []

    def no_cluster(*args, **kwargs):
        started.append(args)
        raise RuntimeError("a backfill with nothing to score started a cluster")

    monkeypatch.setattr(musc_tasks.cluster, "start_local_cluster", no_cluster)
    capsys.readouterr()
    assert main([*backfill, "--out", str(out), *BACKBONE_A]) == 0
    assert capsys.readouterr().out.count("already scored with this backbone") == len(DAYS)
    assert started == []

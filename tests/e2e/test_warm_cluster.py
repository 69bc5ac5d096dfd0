"""The run's local cluster starts while the catalog runs and warms its workers, but only for a night with images."""

import subprocess
import sys
from datetime import date
from pathlib import Path

import pytest
from distributed import Client

import musc_tasks.cluster
from flows.score import score_captures
from musc_tasks import tables
from musc_tasks.cluster import run_cluster
from musc_tasks.config import BackboneSpec

from .conftest import subprocess_env

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*RANDOM weights")]

REPO = Path(__file__).parents[2]


def _model_cache_after_a_block(spec: BackboneSpec) -> tuple[int, int] | str:
    """On a worker, what the first extraction block finds: (models loaded, cache hits) after it, or its error."""
    from musc_tasks.extract import worker_backbone

    try:
        worker_backbone(spec, "cpu")
    except Exception as error:
        return f"{type(error).__name__}: {error}"
    info = worker_backbone.cache_info()
    return info.misses, info.hits


def _on_every_worker(cluster, spec: BackboneSpec) -> list:
    with Client(cluster.address(), set_as_default=False) as client:
        workers = list(client.scheduler_info()["workers"])
        futures = [client.submit(_model_cache_after_a_block, spec, workers=[w], pure=False) for w in workers]
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
    assert "HF_HUB_OFFLINE is set" in last and "warm" not in done.stderr.lower()

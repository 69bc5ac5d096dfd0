"""One Prefect test server and one 2-worker Dask LocalCluster for the whole session."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..conftest import TINY_CONFIG, TINY_SPEC, backbone_options

BIN = Path(sys.executable).parent


@pytest.fixture(scope="session")
def prefect_api():
    """A real Prefect API (temporary SQLite); yields its URL for subprocess runs."""
    from prefect.settings import get_current_settings
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield str(get_current_settings().api.url)


@pytest.fixture(scope="session")
def dask_address():
    from distributed import LocalCluster

    # an existing cluster's workers as README starts them: the stages imported as each starts
    preload = ["musc_tasks.worker_imports"]
    with LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        preload=preload,
        scheduler_kwargs={"dashboard_address": "127.0.0.1:0"},  # its HTTP on a free port: no 8787 warning
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="session")
def tiny_backbone():
    from musc_tasks.config import BackboneSpec

    # 224 px (16x16 patches): even random weights then separate the demo's planted defects
    return BackboneSpec(
        name="musc-tiny-vit", pretrained=None, image_size=224, layers=(1, 3), model_config_path=TINY_CONFIG
    )


@pytest.fixture(scope="session")
def demo_day(tmp_path_factory):
    from musc_tasks.demo import make_demo_day

    return make_demo_day(tmp_path_factory.mktemp("day"), seed=1, images_per_product=10, defects_per_product=2)


def subprocess_env(api_url: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(PREFECT_API_URL=api_url, HF_HUB_OFFLINE="1", DO_NOT_TRACK="1", PREFECT_SERVER_ANALYTICS_ENABLED="false")
    return env


def score(demo_day, out_dir, prefect_api, dask_address=None):
    """`musc score` of the demo day with the tiny backbone, to completion."""
    command = score_command(demo_day, out_dir, dask_address)
    return subprocess.run(command, env=subprocess_env(prefect_api), capture_output=True, text=True, timeout=400)


def score_command(demo_day, out_dir, dask_address=None) -> list[str]:
    command = [
        str(BIN / "musc"),
        "score",
        str(demo_day.input_dir),
        "--out",
        str(out_dir),
        "--date",
        "2026-11-20",
        *backbone_options(TINY_SPEC),
    ]
    if dask_address:
        command += ["--dask-address", dask_address]
    return command


@pytest.fixture(scope="session")
def local_cli_run(demo_day, prefect_api, tmp_path_factory):
    """OUT of an undisturbed `musc score` of the demo day on the default LocalCluster: the reference."""
    out_dir = tmp_path_factory.mktemp("local-cli") / "out"
    done = score(demo_day, out_dir, prefect_api)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (out_dir.parent / "stderr.txt").write_text(done.stderr)
    return out_dir


def assert_flags_masks_and_margins_agree(out_dir) -> int:
    """The README's rule on a published OUT: a flagged image has a non-empty mask PNG and a region,
    an image that is not flagged has neither, the margin is positive exactly on flagged images,
    and OUT/crops holds one JPEG per region row.

    Returns the number of flagged images checked.
    """
    import numpy as np
    from PIL import Image

    from musc_tasks import tables

    scores = tables.read_table(out_dir / "tables" / "scores")
    scores = scores[scores["status"] == "scored"]
    regions = tables.read_table(out_dir / "tables" / "regions")
    assert len(scores) and scores["margin"].notna().all()
    assert ((scores["margin"] > 0) == scores["flagged"]).all(), "margin > 0 must be the flag"
    assert set(regions["region_rule"]) <= {"pixel_threshold", "peak"}
    for row in scores.itertuples():
        mask = np.asarray(Image.open(out_dir / row.mask_path)) > 0
        mine = regions[(regions["path"] == row.path) & (regions["date"] == row.date)]
        if row.flagged:
            assert mask.any() and len(mine) >= 1, f"flagged {row.path}: empty mask or no region"
            assert row.anomalous_fraction == mask.mean() and not np.isnan(row.mask_level)
        else:
            assert not mask.any() and mine.empty, f"{row.path} is not flagged but has a mask or a region"
    # a crop for each region row, and no other crop
    crops = sorted(str(p) for p in (out_dir / "crops").rglob("*") if p.is_file())
    assert crops == sorted(regions["crop_path"]), "the crops folder must hold exactly the regions' crops"
    for path in regions["crop_path"]:
        with Image.open(path) as crop:
            assert crop.format == "JPEG" and min(crop.size) > 0
    return int(scores["flagged"].sum())

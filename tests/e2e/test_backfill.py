"""Two days scored with backbone A, re-scored with backbone B; both coexist; compare reports."""

import shutil

import pytest

from musc_tasks import tables
from musc_tasks.cli import main

from ..conftest import TINY_CONFIG, TINY_CONFIG_B

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


def test_backfill_with_another_backbone_coexists_and_compares(prefect_api, two_days, tmp_path, capsys):
    out = tmp_path / "out"
    for day in DAYS:
        assert main(["score", str(two_days / day), "--out", str(out), "--date", day, *BACKBONE_A]) == 0
    pattern = str(two_days / "{date}")
    assert (
        main(["backfill", "--from", DAYS[0], "--to", DAYS[1], "--input-root", pattern, "--out", str(out), *BACKBONE_B])
        == 0
    )

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
    assert (
        main(["backfill", "--from", DAYS[0], "--to", DAYS[1], "--input-root", pattern, "--out", str(out), *BACKBONE_B])
        == 0
    )
    assert capsys.readouterr().out.count("already scored with this backbone") == 2
    assert len(tables.read_table(out / "tables" / "runs")) == runs_before

    assert main(["compare", "--out", str(out), "--date", DAYS[0], "--backbones", "musc-tiny-vit_,musc-tiny-vit-b"]) == 0
    report = capsys.readouterr().out
    assert "spearman" in report and "changed flag" in report
    for product in scores["product"].unique():
        assert product in report

"""`musc evaluate` on a small MVTec-layout dataset built from the demo's planted defects."""

import shutil

import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from musc_tasks import tables
from musc_tasks.cli import main
from musc_tasks.core import image_metrics, pixel_metrics, split_by_type, upsample_maps
from musc_tasks.datasets import choose_shots, train_good_images
from musc_tasks.demo import make_demo_day
from musc_tasks.references import list_reference_sets

from ..conftest import TINY_CONFIG

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*RANDOM weights")]
TINY = [
    "--backbone",
    "musc-tiny-vit",
    "--model-config",
    str(TINY_CONFIG),
    "--pretrained",
    "none",
    "--image-size",
    "224",
    "--layers",
    "1,3",
    "--device",
    "cpu",
]


@pytest.fixture(scope="module")
def tiny(dask_address):
    """The tiny backbone's options, on the session's Dask cluster (no LocalCluster per run)."""
    return [*TINY, "--dask-address", dask_address]


@pytest.fixture(scope="module")
def mvtec_root(demo_day, tmp_path_factory):
    root = tmp_path_factory.mktemp("mvtec")
    for image in demo_day.images:
        kind = image.defect_kind if image.is_defective else "good"
        target = root / image.product / "test" / kind / image.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image.path, target)
        if image.is_defective:
            mask = image.mask_path
            gt = root / image.product / "ground_truth" / kind / mask.name
            gt.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(mask, gt)
    # normal training images (another seed: none is a test image), for few-shot references
    train = make_demo_day(tmp_path_factory.mktemp("train"), seed=2, images_per_product=3, defects_per_product=0)
    for image in train.images:
        target = root / image.product / "train" / "good" / image.path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(image.path, target)
    return root


def test_metrics_table_matches_metrics_recomputed_from_outputs(prefect_api, mvtec_root, tiny, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["evaluate", str(mvtec_root), "--layout", "mvtec", "--out", str(out), *tiny]) == 0
    printed = capsys.readouterr().out
    assert "AUROC-cls" in printed and "mean" in printed

    assert not (out / "tables").exists() and not (out / "reports").exists(), "evaluation beside the nights"
    evaluation = out / "evaluation"
    metrics = tables.read_table(evaluation / "tables" / "metrics").set_index("category")
    scores = tables.read_table(evaluation / "tables" / "scores")
    categories = sorted(scores["product"].unique())
    assert list(metrics.index) == [*categories, "mean"] or sorted(metrics.index) == sorted([*categories, "mean"])
    for category in categories:
        rows = scores[scores["product"] == category].sort_values("path")
        labels = ~rows["path"].str.contains("/good/")
        expected = image_metrics(rows["score"].to_numpy(), labels.to_numpy())
        assert metrics.loc[category, "image_auroc"] == pytest.approx(expected["auroc"])
        assert metrics.loc[category, "image_ap"] == pytest.approx(expected["ap"])

        maps, masks = [], []
        pools = {}
        for store in (evaluation / "cache" / "pools").rglob("*.zarr"):
            group = zarr.open_group(store, mode="r")
            for row, image_id in enumerate(group.attrs["image_ids"]):
                pools[image_id] = (group, row)
        for row in rows.itertuples():
            group, index = pools[row.image_id]
            patch = torch.from_numpy(group["patch_scores"][index : index + 1])
            maps.append(upsample_maps(patch, tuple(group.attrs["grid"]), (224, 224))[0].numpy())
            if "/good/" in row.path:
                masks.append(np.zeros((224, 224), bool))
            else:
                kind = row.path.split("/")[-2]
                stem = row.path.split("/")[-1][:-4]
                with Image.open(mvtec_root / category / "ground_truth" / kind / f"{stem}_mask.png") as mask:
                    resized = np.asarray(mask.convert("L").resize((224, 224), Image.Resampling.BILINEAR))
                masks.append(resized == 255)
        expected = pixel_metrics(np.stack(maps), np.stack(masks))
        for key in ("auroc", "ap", "f1_max"):
            assert metrics.loc[category, f"pixel_{key}"] == pytest.approx(expected[key])
        assert metrics.loc[category, "aupro"] == pytest.approx(expected["aupro"])
        assert metrics.loc[category, "n_images"] == len(rows)
    assert metrics.loc["mean", "image_auroc"] == pytest.approx(metrics.loc[categories, "image_auroc"].mean())

    # musc query reaches the evaluation's tables by their own names; there is no night to query
    sql = "SELECT (SELECT count(*) FROM eval_scores) n, (SELECT count(*) FROM metrics) m"
    assert main(["query", sql, "--out", str(out)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == [str(len(scores)), str(len(metrics))]
    assert main(["query", "SELECT * FROM scores", "--out", str(out)]) == 2
    assert "views: eval_scores, eval_regions, eval_runs, eval_days, metrics" in capsys.readouterr().err
    assert (metrics["mask_mode"] == "paper").all()


def test_divide_num_splits_each_category_by_defect_type(prefect_api, mvtec_root, tiny, tmp_path):
    out = tmp_path / "out"
    assert (
        main(
            [
                "evaluate",
                str(mvtec_root),
                "--layout",
                "mvtec",
                "--out",
                str(out),
                "--categories",
                "brick",
                "--divide-num",
                "2",
                *tiny,
            ]
        )
        == 0
    )
    stores = list((out / "evaluation" / "cache" / "pools").rglob("*.zarr"))
    assert len(stores) == 2
    sizes = sorted(len(zarr.open_group(s, mode="r").attrs["image_ids"]) for s in stores)
    types = sorted(p.parent.name for p in (mvtec_root / "brick" / "test").rglob("*.png"))
    assert sizes == sorted(len(subset) for subset in split_by_type(types, 2))
    metrics = tables.read_table(out / "evaluation" / "tables" / "metrics")
    assert set(metrics["category"]) == {"brick", "mean"} and (metrics["pool_size"] == max(sizes)).all()


def test_few_shot_references_from_train_good(prefect_api, mvtec_root, tiny, tmp_path, capsys):
    """--references --shots 2: two seeded train/good images score brick's test set; they are never scored."""
    out = tmp_path / "out"
    argv = ["evaluate", str(mvtec_root), "--layout", "mvtec", "--out", str(out), "--categories", "brick"]
    assert main([*argv, "--references", "--shots", "2", "--seed", "1", *tiny]) == 0
    assert "few-shot: 2 train images per category (seed 1), mode combined" in capsys.readouterr().out

    evaluation = out / "evaluation"
    [stored] = list_reference_sets(evaluation, product="brick")
    drawn = choose_shots(train_good_images(mvtec_root, "mvtec", "brick"), 2, seed=1)
    assert sorted(e.source_path for e in stored.entries) == sorted(str(p.resolve()) for p in drawn)
    assert stored.name == "train-k2-seed1"

    metrics = tables.read_table(evaluation / "tables" / "metrics").set_index("category")
    assert sorted(metrics.index) == ["brick", "mean"]
    assert (metrics["shots"] == 2).all() and (metrics["seed"] == 1).all()
    assert (metrics["reference_mode"] == "combined").all()
    assert metrics.loc["brick", "reference_set"] == stored.label
    [metrics_file] = (evaluation / "tables" / "metrics").rglob("*.parquet")
    assert metrics_file.name.endswith("__combined-k2-seed1.parquet")

    scores = tables.read_table(evaluation / "tables" / "scores").sort_values("path")
    tested = sorted((mvtec_root / "brick" / "test").rglob("*.png"))
    assert sorted(scores["path"]) == sorted(str(p) for p in tested), "only test images are scored"
    assert (scores["reference_set"] == stored.label).all() and (scores["reference_mode"] == "combined").all()
    assert not {e.image_id for e in stored.entries} & set(scores["image_id"])
    assert metrics.loc["brick", "n_images"] == len(tested)
    expected = image_metrics(scores["score"].to_numpy(), ~scores["path"].str.contains("/good/").to_numpy())
    assert metrics.loc["brick", "image_auroc"] == pytest.approx(expected["auroc"])

"""`musc score` and `musc evaluate` end to end with a tiny DINOv2 loaded from a Meta-format file."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from musc_tasks import tables
from musc_tasks.backbone import load_backbone
from musc_tasks.cli import main
from musc_tasks.config import BackboneSpec
from musc_tasks.core import image_metrics, image_scores, pool_patch_scores, rescore_images, upsample_maps
from musc_tasks.imageio import read_rgb

from ..conftest import TINY_DINOV2_CONFIG
from ..unit.test_timm_backbone import meta_state_dict
from .test_evaluate import mvtec_root  # noqa: F401  (the fixture: the demo's day in MVTec AD's layout)

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def meta_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "tiny_dinov2_pretrain.pth"
    torch.save(meta_state_dict("dinov2"), path)
    return path


def tiny_args(meta_file):
    return [
        "--backbone",
        "musc-tiny-dinov2",
        "--model-config",
        str(TINY_DINOV2_CONFIG),
        "--pretrained",
        str(meta_file),
        "--image-size",
        "112",
        "--layers",
        "1,3",
        "--device",
        "cpu",
    ]


def test_score_with_dinov2_equals_the_core_engine(prefect_api, dask_address, demo_day, meta_file, tmp_path):
    out = tmp_path / "out"
    argv = ["score", str(demo_day.input_dir), "--out", str(out), "--date", "2026-11-22", "--dask-address", dask_address]
    assert main([*argv, *tiny_args(meta_file)]) == 0
    spec = BackboneSpec(
        name="musc-tiny-dinov2",
        pretrained=str(meta_file),
        image_size=112,
        layers=(1, 3),
        model_config_path=TINY_DINOV2_CONFIG,
    )
    scores = tables.read_table(out / "tables" / "scores")
    assert len(scores) == len(demo_day.images) and (scores["status"] == "scored").all()
    assert (scores["backbone_key"] == spec.key).all() and "ckpt-" in spec.key  # the weights' digest
    runs = tables.read_table(out / "tables" / "runs")
    assert json.loads(runs["parameters"].iloc[0])["backbone"]["family"] == "dinov2"

    backbone = load_backbone(spec, device="cpu")
    for product, group in scores.groupby("product"):
        group = group.sort_values("path")
        pixels = torch.stack([backbone.preprocess(read_rgb(Path(p))[0]) for p in group["path"]])
        layer_tokens, embeddings = backbone.extract(pixels)
        assert (embeddings.norm(dim=-1) - 1).abs().min() > 0.5, "DINO's image tokens reach RsCIN unnormalised"
        layer_tokens = [t.half().float() for t in layer_tokens]  # the store keeps float16 tokens
        patch = pool_patch_scores(layer_tokens, backbone.grid, (1, 3, 5))
        raw = image_scores(upsample_maps(patch, backbone.grid, (112, 112))).double().numpy()
        np.testing.assert_allclose(group["raw_score"], raw, atol=1e-6, rtol=0)
        np.testing.assert_allclose(
            group["score"], rescore_images(raw, embeddings.numpy(), (1, 2, 3)), atol=1e-6, rtol=0
        )


def test_evaluate_with_dinov2(prefect_api, dask_address, mvtec_root, meta_file, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "out"
    argv = ["evaluate", str(mvtec_root), "--layout", "mvtec", "--out", str(out), "--dask-address", dask_address]
    assert main([*argv, *tiny_args(meta_file)]) == 0
    assert "AUROC-cls" in capsys.readouterr().out
    metrics = tables.read_table(out / "evaluation" / "tables" / "metrics").set_index("category")
    scores = tables.read_table(out / "evaluation" / "tables" / "scores")
    assert sorted(metrics.index) == sorted([*scores["product"].unique(), "mean"])
    assert metrics["backbone_key"].str.startswith("musc-tiny-dinov2__ckpt-").all()
    for category, rows in scores.groupby("product"):
        expected = image_metrics(rows["score"].to_numpy(), ~rows["path"].str.contains("/good/").to_numpy())
        assert metrics.loc[category, "image_auroc"] == pytest.approx(expected["auroc"])
        assert 0 <= metrics.loc[category, "pixel_auroc"] <= 1 and 0 <= metrics.loc[category, "aupro"] <= 1

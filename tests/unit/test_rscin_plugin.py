"""`musc rscin`: another method's scores re-scored per product, checked against the core RsCIN."""

import numpy as np
import pandas as pd
import pytest
import torch
from numpy.testing import assert_allclose
from PIL import Image

from musc_tasks.backbone import load_backbone
from musc_tasks.cli import main
from musc_tasks.config import BackboneSpec
from musc_tasks.core import rescore_images
from musc_tasks.imageio import read_rgb
from musc_tasks.rscin_plugin import read_score_table, rscin_rescore_scores, write_score_table

from ..conftest import TINY_DINOV2_CONFIG, backbone_options

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM weights")

SPEC = BackboneSpec(
    name="musc-tiny-dinov2", pretrained=None, image_size=112, layers=(1, 3), model_config_path=TINY_DINOV2_CONFIG
)
TINY = backbone_options(SPEC)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """ROOT/<product>/*.png: 5 + 4 readable images, a file that is not an image, a lone image."""
    root = tmp_path_factory.mktemp("captures")
    rng = np.random.default_rng(0)
    rows = []
    for product, count in (("bottle", 5), ("cable", 4), ("lonely", 1)):
        (root / product).mkdir()
        base = rng.integers(0, 256, (3, 3, 3))
        for index in range(count):
            pixels = np.kron(base, np.ones((24, 24, 1))) + rng.normal(0, 20 + 15 * index, (72, 72, 3))
            name = f"{product}/{index:03d}.png"
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / name)
            rows.append({"path": name, "score": float(rng.uniform(0, 3)), "method": "patchcore"})
    (root / "cable" / "broken.png").write_text("not an image")
    rows.append({"path": "cable/broken.png", "score": 1.0, "method": "patchcore"})
    rows.append({"path": "bottle/missing.png", "score": 2.0, "method": "patchcore"})
    rows.append({"path": "bottle/000.png", "score": "n/a", "method": "patchcore"})
    return root, pd.DataFrame(rows)


def expected_rscin(root, table, k_list):
    """The core RsCIN on each product's scores and its tokens, computed here from the files."""
    backbone = load_backbone(SPEC, device="cpu")
    out = {}
    for product, rows in table.groupby(table["path"].str.split("/").str[0]):
        pixels = torch.stack([backbone.preprocess(read_rgb(root / path)[0]) for path in rows["path"]])
        _, tokens = backbone.extract(pixels)
        out.update(zip(rows["path"], rescore_images(rows["score"].to_numpy(float), tokens.numpy(), k_list)))
    return out


def test_rescored_like_the_core_per_product_and_bad_rows_reported(images):
    root, table = images
    result = rscin_rescore_scores(table, root, SPEC, k_list=(1, 2, 3), device="cpu")
    assert list(result.columns) == ["path", "score", "rscin_score", "method", "product", "rscin_status", "rscin_reason"]
    assert len(result) == len(table) and (result["path"] == table["path"]).all()
    good = result[result["rscin_status"] == "rescored"]
    assert set(good["product"]) == {"bottle", "cable"} and len(good) == 9
    expected = expected_rscin(root, good, (1, 2, 3))
    assert_allclose(good["rscin_score"], [expected[p] for p in good["path"]], rtol=1e-6, atol=1e-9)
    assert good["rscin_reason"].isna().all()

    why = result.set_index(["path", "score"], drop=False)["rscin_reason"].astype(str)
    status = result.set_index(["path", "score"])["rscin_status"]
    assert status[("cable/broken.png", 1.0)] == "failed" and "broken.png" in why[("cable/broken.png", 1.0)]
    assert status[("bottle/missing.png", 2.0)] == "failed" and "missing.png" in why[("bottle/missing.png", 2.0)]
    assert status[("bottle/000.png", "n/a")] == "failed" and "'n/a' is not a number" in why[("bottle/000.png", "n/a")]
    lonely = result[result["product"] == "lonely"].iloc[0]
    assert lonely["rscin_status"] == "not_rescored" and "at least 2" in lonely["rscin_reason"]
    assert np.isnan(result.loc[result["rscin_status"] != "rescored", "rscin_score"]).all()


def test_command_reads_csv_and_parquet_and_reuses_the_token_store(images, tmp_path, capsys):
    root, table = images
    table = table.assign(path=[str(root / p) if i % 2 else p for i, p in enumerate(table["path"])])  # absolute too
    table = table.rename(columns={"path": "file", "score": "anomaly"})
    csv_in, parquet_in = tmp_path / "scores.csv", tmp_path / "scores.parquet"
    table.to_csv(csv_in, index=False)
    table.assign(anomaly=pd.to_numeric(table["anomaly"], errors="coerce")).to_parquet(parquet_in)
    common = ["rscin", "--images", str(root), "--path-column", "file", "--score-column", "anomaly", "--k", "1,2", *TINY]

    assert main([*common, "--scores", str(csv_in), "--out", str(tmp_path / "from_csv.csv")]) == 0
    assert "9 re-scored in 2 product(s), 3 failed, 1 not re-scored" in capsys.readouterr().out
    cache = tmp_path / "results"
    assert (
        main([*common, "--scores", str(parquet_in), "--out", str(tmp_path / "out.parquet"), "--cache", str(cache)]) == 0
    )
    stores = list((cache / "cache" / "tokens").glob("*/bottle.zarr"))
    assert len(stores) == 1, "tokens go to the pipeline's token store of this backbone"
    before = {p: p.stat().st_mtime_ns for p in stores[0].rglob("*") if p.is_file()}
    assert (
        main([*common, "--scores", str(parquet_in), "--out", str(tmp_path / "again.parquet"), "--cache", str(cache)])
        == 0
    )
    assert before == {p: p.stat().st_mtime_ns for p in stores[0].rglob("*") if p.is_file()}, (
        "second run reuses the store"
    )

    from_csv = read_score_table(tmp_path / "from_csv.csv")
    from_parquet, again = read_score_table(tmp_path / "out.parquet"), read_score_table(tmp_path / "again.parquet")
    assert list(from_parquet.columns[:3]) == ["file", "anomaly", "rscin_score"]
    assert_allclose(pd.to_numeric(from_csv["rscin_score"]), from_parquet["rscin_score"], rtol=1e-6)
    pd.testing.assert_frame_equal(from_parquet, again)
    relative = table.assign(path=[str(f).removeprefix(f"{root}/") for f in table["file"]], score=table["anomaly"])
    ok = from_parquet["rscin_status"] == "rescored"
    expected = expected_rscin(root, relative[ok.to_numpy()].assign(score=lambda f: f["score"].astype(float)), (1, 2))
    assert_allclose(from_parquet.loc[ok, "rscin_score"], list(expected.values()), rtol=1e-5)


def test_bad_arguments_are_clear(images, tmp_path):
    root, table = images
    with pytest.raises(ValueError, match="no column 'score_x'.*path, score"):
        rscin_rescore_scores(table, root, SPEC, score_column="score_x")
    with pytest.raises(ValueError, match="has a 'product' column"):
        rscin_rescore_scores(table.assign(product="x"), root, SPEC)
    with pytest.raises(NotADirectoryError):
        rscin_rescore_scores(table, tmp_path / "nowhere", SPEC)
    with pytest.raises(ValueError, match=r"\.csv or \.parquet"):
        write_score_table(table, tmp_path / "out.xlsx")
    outside = table.assign(path=[str(tmp_path / "elsewhere.png")] + list(table["path"][1:]))
    result = rscin_rescore_scores(outside, root, SPEC, device="cpu")
    assert "not inside the images root" in result["rscin_reason"].iloc[0]

"""The real nightly flow: Prefect, Zarr, a 2-worker Dask cluster, Parquet read back by DuckDB."""

import json
import shutil
import subprocess
import sys
from datetime import date
from pathlib import Path

import duckdb
import numpy as np
import pytest
import torch
import zarr
from PIL import Image

from flows.score import score_captures
from musc_tasks import tables
from musc_tasks.backbone import load_backbone
from musc_tasks.config import ScoringParams, patch_size
from musc_tasks.core import image_scores, pixel_metrics, pool_patch_scores, rescore_images, upsample_maps
from musc_tasks.imageio import read_rgb
from musc_tasks.layout import pool_stores_dir
from musc_tasks.manifests import ImageRecord
from musc_tasks.maps import read_map
from musc_tasks.preprocess import read_mask, squash_normalise
from musc_tasks.publish import ProductPlan, finish_product, publish_block
from musc_tasks.render import image_mask
from musc_tasks.rscin import patch_score_rows, read_product_scores, score_map

from .conftest import assert_flags_masks_and_margins_agree, subprocess_env
from .processes import wait_until_idle

pytestmark = [pytest.mark.e2e, pytest.mark.filterwarnings("ignore:.*RANDOM weights")]

RUN_DATE = date(2026, 11, 22)
SCORING = ScoringParams(task_images=3)


def run_flow(input_dir, out_dir, backbone, dask_address, **kwargs):
    return score_captures(
        input_dir=str(input_dir),
        out_dir=str(out_dir),
        run_date=RUN_DATE,
        backbone=backbone,
        scoring=SCORING,
        device="cpu",
        dask_address=dask_address,
        **kwargs,
    )


def query(out_dir, sql):
    scores = f"read_parquet('{out_dir}/tables/scores/**/*.parquet', hive_partitioning=true)"
    return duckdb.sql(sql.format(scores=scores)).df()


def comparable(out_dir, table):
    """The table without its run ids and with its OUT paths relative, to compare two OUTs."""
    frame = tables.read_table(Path(out_dir) / "tables" / table).drop(columns=["run_id"])
    for column in {"mask_path", "heatmap_path", "crop_path"} & set(frame.columns):
        assert frame[column].dropna().map(lambda p: Path(p).is_relative_to(out_dir)).all(), "not absolute in OUT"
        frame[column] = frame[column].str.removeprefix(f"{out_dir}/")
    return frame.sort_values(list(frame.columns[:3])).reset_index(drop=True)


@pytest.fixture(scope="module")
def first_run(prefect_api, dask_address, demo_day, tiny_backbone, tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("out")
    summary = run_flow(demo_day.input_dir, out_dir, tiny_backbone, dask_address)
    return out_dir, summary


def test_tables_masks_and_heatmaps(first_run, demo_day):
    out_dir, summary = first_run
    n_files = len(demo_day.images)
    assert summary.n_images == summary.n_scored == n_files and summary.n_failed == 0
    rows = query(out_dir, "select * from {scores}")
    assert len(rows) == n_files
    assert set(rows.columns) == {f.name for f in tables.SCORES_SCHEMA} | {"date", "product"}
    assert (rows["status"] == "scored").all()
    assert set(rows["product"]) == {image.product for image in demo_day.images}
    per_product = query(
        out_dir, "select product, min(rank) lo, max(rank) hi, count(*) n from {scores} group by product"
    )
    assert (per_product["lo"] == 1).all() and (per_product["hi"] == per_product["n"]).all()
    for row in rows.itertuples():
        with Image.open(row.path) as original:
            size = original.size
        for written_path in (row.mask_path, row.heatmap_path):
            assert Path(written_path).is_absolute() and Path(written_path).is_relative_to(out_dir)
            with Image.open(written_path) as written:
                assert written.size == size
    regions = tables.read_table(out_dir / "tables" / "regions")
    assert set(regions["image_id"]) <= set(rows["image_id"])
    assert assert_flags_masks_and_margins_agree(out_dir) == summary.n_flagged
    runs = tables.read_table(out_dir / "tables" / "runs")
    assert len(runs) == 1 and runs["images_extracted"].iloc[0] == n_files


def test_planted_defects_light_up_in_the_anomaly_maps(first_run, demo_day, tiny_backbone):
    """Pixels inside planted defects score above the rest, product by product.

    Pixel level, because with random-weight features and two defective images among ten the
    image ranking is a weak statistic (an image AUROC is 16 comparisons); tens of thousands of
    pixels are not, and a map shifted, flipped or given to the wrong image fails this at once.
    """
    out_dir, _ = first_run
    rows = query(out_dir, "select image_id, path, product from {scores}")
    pools = sorted((pool_stores_dir(str(out_dir), tiny_backbone.key)).rglob("*.zarr"))
    where = patch_score_rows(pools)
    truth = {str(image.path): image.mask_path for image in demo_day.images}
    for product, group in rows.groupby("product"):
        maps, masks = [], []
        for row in group.itertuples():
            with Image.open(row.path) as original:
                width, height = original.size
            maps.append(score_map(*where[row.image_id], height, width))
            mask_path = truth[row.path]
            masks.append(read_mask(mask_path) if mask_path else np.zeros((height, width), bool))
        auroc = pixel_metrics(np.stack(maps), np.stack(masks), pro=False)["auroc"]
        assert auroc >= 0.85, f"{product}: planted defects do not stand out in the maps (pixel AUROC {auroc:.3f})"


def test_scores_equal_the_core_engine_in_memory(first_run, demo_day, tiny_backbone):
    out_dir, _ = first_run
    rows = query(out_dir, "select path, product, score, raw_score from {scores}")
    backbone = load_backbone(tiny_backbone, device="cpu")
    for product, group in rows.groupby("product"):
        group = group.sort_values("path")
        size = tiny_backbone.image_size
        pixels = torch.stack([squash_normalise(read_rgb(Path(p))[0], size) for p in group["path"]])
        layer_tokens, embeddings = backbone.extract(pixels)
        layer_tokens = [t.half().float() for t in layer_tokens]  # the store keeps float16 tokens
        patch = pool_patch_scores(layer_tokens, backbone.grid, SCORING.r_list, tile=SCORING.task_images)
        raw = image_scores(upsample_maps(patch, backbone.grid, (size, size))).double().numpy()
        final = rescore_images(raw, embeddings.numpy(), SCORING.rscin_k)
        np.testing.assert_allclose(group["raw_score"], raw, atol=1e-6, rtol=0)
        np.testing.assert_allclose(group["score"], final, atol=1e-6, rtol=0)


def test_maps_store_reproduces_masks_and_regions(first_run, tiny_backbone):
    """The stored float16 map, upsampled, is exactly what each mask and region row was made from."""
    out_dir, _ = first_run
    rows = tables.read_table(out_dir / "tables" / "scores")
    regions = tables.read_table(out_dir / "tables" / "regions")
    assert rows["heatmap_min"].eq(rows["pixel_threshold"]).all()
    assert (rows["heatmap_max"] >= rows["heatmap_min"]).all()
    for row in rows.itertuples():
        pixel_scores, info = read_map(out_dir, "2026-11-22", row.product, row.path)
        patch_map, _ = read_map(out_dir, "2026-11-22", row.product, row.path, upsample=False)
        side = tiny_backbone.image_size // patch_size(tiny_backbone)
        assert patch_map.shape == (side, side)
        assert pixel_scores.shape == (row.height, row.width) and info["image_id"] == row.image_id
        mask = np.asarray(Image.open(out_dir / row.mask_path)) > 0
        mine = regions[regions["path"] == row.path].sort_values("region")
        expected, rule, level = image_mask(pixel_scores, row.pixel_threshold, flagged=row.flagged)
        np.testing.assert_array_equal(mask, expected)
        if not row.flagged:
            assert not mask.any() and np.isnan(row.mask_level) and mine.empty
            continue
        assert row.mask_level == level and list(mine["region_rule"].unique()) == [rule]
        np.testing.assert_array_equal(mask, pixel_scores > row.mask_level)
        if rule == "pixel_threshold":
            np.testing.assert_array_equal(mask, pixel_scores.astype(np.float64) > row.pixel_threshold)
        assert mine["max_score"].iloc[0] == pytest.approx(float(pixel_scores[mask].max()), abs=1e-7)
    legend = out_dir / "heatmaps" / "2026-11-22" / rows["product"].iloc[0] / tiny_backbone.key / "_legend.png"
    assert legend.is_file()


def test_musc_maps_command(first_run, tmp_path):
    out_dir, _ = first_run
    row = tables.read_table(out_dir / "tables" / "scores").iloc[0]
    saved = tmp_path / "map.npy"
    shown = subprocess.run(
        [sys.executable, "-m", "musc_tasks.cli", "maps", "--out", str(out_dir), "--date", "2026-11-22"]
        + ["--product", row["product"], row["path"], "--save", str(saved)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert shown.returncode == 0, shown.stderr
    assert row["path"] in shown.stdout and "pixel threshold" in shown.stdout
    expected, _ = read_map(out_dir, "2026-11-22", row["product"], row["path"])
    np.testing.assert_array_equal(np.load(saved), expected)


def test_serial_publish_writes_what_the_dask_tasks_wrote(first_run, tiny_backbone, tmp_path):
    """The flow published in Dask tasks on 2 workers; the same blocks in one process write the same."""
    out_dir, _ = first_run
    serial_dir = tmp_path / "serial"
    (catalog_file,) = (out_dir / "cache" / "catalogs").rglob("*.json")
    published = tables.read_table(out_dir / "tables" / "scores")
    regions = tables.read_table(out_dir / "tables" / "regions")
    for product, raw_records in json.loads(catalog_file.read_text()).items():
        pools = pool_stores_dir(str(out_dir), tiny_backbone.key, product)
        (scores_file,) = pools.glob("scores-*.json")
        plan = ProductPlan.make(
            serial_dir,
            "2026-11-22",
            product,
            [ImageRecord(**record) for record in raw_records],
            read_product_scores(scores_file),
            sorted(pools.glob("*.zarr")),
            backbone_key=tiny_backbone.key,
            run_id="serial",
        )
        assert len(plan.blocks()) > 1
        rows = finish_product(plan, [publish_block(plan, start, stop) for start, stop in plan.blocks()])
        theirs = published[published["product"] == product].sort_values("path")
        ours = sorted(rows.scores, key=lambda r: r["path"])
        for column in ("path", "score", "rank", "flagged", "anomalous_fraction", "mask_path", "heatmap_path"):
            in_out = [
                r[column].replace(str(serial_dir), str(out_dir)) if "_path" in column else r[column] for r in ours
            ]
            assert list(theirs[column]) == in_out, column
        theirs = regions[regions["product"] == product]
        assert sorted(theirs["crop_path"]) == sorted(
            r["crop_path"].replace(str(serial_dir), str(out_dir)) for r in rows.regions
        )
    written = sorted(p.relative_to(serial_dir) for p in serial_dir.rglob("*") if p.is_file())
    assert written and all((serial_dir / p).read_bytes() == (out_dir / p).read_bytes() for p in written)


def test_second_run_is_served_from_cache_and_identical(first_run, demo_day, tiny_backbone, dask_address):
    out_dir, _ = first_run
    before = {name: comparable(out_dir, name) for name in ("scores", "regions")}
    published = ("masks", "heatmaps", "crops", "maps")
    files_before = {p: p.read_bytes() for kind in published for p in sorted((out_dir / kind).rglob("*")) if p.is_file()}
    summary = run_flow(demo_day.input_dir, out_dir, tiny_backbone, dask_address)
    assert summary.images_extracted == 0 and summary.pairs_computed == 0
    runs = tables.read_table(out_dir / "tables" / "runs").sort_values("started_at")
    assert list(runs["images_extracted"]) == [len(demo_day.images), 0]
    assert runs["pairs_computed"].iloc[1] == 0 and runs["pairs_cached"].iloc[1] > 0
    for name, frame in before.items():
        assert frame.equals(comparable(out_dir, name)), f"{name} changed on a cached re-run"
    files_after = {p: p.read_bytes() for kind in published for p in sorted((out_dir / kind).rglob("*")) if p.is_file()}
    assert files_before.keys() == files_after.keys()
    assert [p for p in files_before if files_before[p] != files_after[p]] == [], "published bytes changed"
    assert len(query(out_dir, "select * from {scores}")) == len(demo_day.images), "re-run duplicated rows"


KILL_SCRIPT = """
import sys, json
from datetime import date
from flows.score import score_captures
from musc_tasks.config import BackboneSpec, ScoringParams
score_captures(input_dir=sys.argv[1], out_dir=sys.argv[2], run_date=date(2026, 11, 22),
               backbone=BackboneSpec.model_validate_json(sys.argv[3]),
               scoring=ScoringParams.model_validate_json(sys.argv[4]), device="cpu", dask_address=sys.argv[5])
"""


@pytest.mark.parametrize("kill_at", ["catalog", "extract-block:1", "score-task:4", "rscin:2", "publish-product:2"])
def test_resume_after_sigkill_redoes_only_what_is_missing(
    kill_at, first_run, prefect_api, dask_address, demo_day, tiny_backbone, tmp_path
):
    reference_dir, _ = first_run
    out_dir = tmp_path / "out"
    command = [
        sys.executable,
        "-c",
        KILL_SCRIPT,
        str(demo_day.input_dir),
        str(out_dir),
        tiny_backbone.model_dump_json(),
        SCORING.model_dump_json(),
        dask_address,
    ]
    env = {**subprocess_env(prefect_api), "MUSC_KILL_AT": kill_at}
    crashed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert crashed.returncode == -9, crashed.stderr[-3000:]

    wait_until_idle(dask_address)  # tasks already running on the cluster finish after the crash
    token_blocks = list((out_dir / "cache" / "tokens").rglob("blocks/*.json"))
    pair_markers = list((out_dir / "cache" / "pools").rglob("done/pair-*"))
    if kill_at.startswith("extract"):
        # products extract side by side: the run died after one block; the first blocks of the other two
        # products may have been in flight and ended on the workers; no second block was submitted
        assert len(token_blocks) in (1, 2, 3) and not pair_markers
    elif kill_at.startswith("score"):
        assert pair_markers and not list((out_dir / "tables").rglob("*.parquet"))
    elif kill_at.startswith("publish"):
        assert len(list((out_dir / "tables" / "scores").rglob("*.parquet"))) == 2  # 2 of 3 products
    cached_images = sum(len(json.loads(p.read_text())["image_ids"]) for p in token_blocks)
    done_pairs = len(list((out_dir / "cache" / "pools").rglob("done/pair-*")))

    summary = run_flow(demo_day.input_dir, out_dir, tiny_backbone, dask_address)
    assert summary.images_extracted == len(demo_day.images) - cached_images
    assert summary.images_token_cached == cached_images
    if kill_at.startswith("score"):
        assert summary.images_extracted == 0
        assert summary.pairs_cached == done_pairs and summary.pairs_computed > 0
    if kill_at.startswith(("rscin", "publish")):
        assert summary.images_extracted == 0 and summary.pairs_computed == 0
    for name in ("scores", "regions"):
        assert comparable(out_dir, name).equals(comparable(reference_dir, name)), f"{name} differ after resume"
    masks = sorted(p.relative_to(out_dir) for p in (out_dir / "masks").rglob("*.png"))
    assert masks == sorted(p.relative_to(reference_dir) for p in (reference_dir / "masks").rglob("*.png"))
    assert all((out_dir / m).read_bytes() == (reference_dir / m).read_bytes() for m in masks)
    stores = sorted(p.relative_to(out_dir) for p in (out_dir / "cache" / "pools").rglob("*.zarr"))
    assert stores == sorted(p.relative_to(reference_dir) for p in (reference_dir / "cache" / "pools").rglob("*.zarr"))
    for store in stores:
        ours, theirs = (zarr.open_group(d / store, mode="r")["patch_scores"][:] for d in (out_dir, reference_dir))
        assert ours.tobytes() == theirs.tobytes(), f"{store}: maps differ after resume"


def test_deleting_out_or_its_token_cache_recomputes_the_same_results(
    prefect_api, dask_address, demo_day, tiny_backbone, tmp_path
):
    """Prefect's cache lives in OUT: `rm -rf OUT` (or OUT/cache/tokens) and a re-run computes it all again."""
    out_dir = tmp_path / "out"

    def outputs():
        masks = {p.relative_to(out_dir): p.read_bytes() for p in sorted((out_dir / "masks").rglob("*.png"))}
        return {name: comparable(out_dir, name) for name in ("scores", "regions")}, masks

    run_flow(demo_day.input_dir, out_dir, tiny_backbone, dask_address)
    assert (out_dir / "cache" / "prefect").is_dir(), "cached results are not kept with the data"
    tables_before, masks_before = outputs()
    assert masks_before

    shutil.rmtree(out_dir)
    summary = run_flow(demo_day.input_dir, out_dir, tiny_backbone, dask_address)
    assert summary.images_extracted == len(demo_day.images)
    tables_after, masks_after = outputs()
    assert masks_after == masks_before
    assert all(tables_before[name].equals(tables_after[name]) for name in tables_before)

    shutil.rmtree(out_dir / "cache" / "tokens")
    summary = run_flow(demo_day.input_dir, out_dir, tiny_backbone, dask_address)
    assert summary.images_extracted == len(demo_day.images)
    tables_after, masks_after = outputs()
    assert masks_after == masks_before
    assert all(tables_before[name].equals(tables_after[name]) for name in tables_before)

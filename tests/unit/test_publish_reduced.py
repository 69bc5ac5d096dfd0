"""Publishing with reduced decodes writes the masks, regions and maps of full decodes, to the byte.

A capture whose heatmap is bounded is decoded at a reduced JPEG scale, and an image that is not
flagged never gets its map upsampled to its full size; the reference here is what publish did
before: every capture decoded whole, its map upsampled to its size, ``image_mask`` and
``region_rows`` on it, and the heatmap drawn from that (``_overlay`` given the full image).
"""

import io
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from musc_tasks import publish
from musc_tasks.config import OutputPolicy
from musc_tasks.imageio import bounded_size, read_rgb
from musc_tasks.maps import read_map, upsample_map
from musc_tasks.publish import ProductPlan, _overlay, finish_product, publish_block
from musc_tasks.render import encode_image, image_mask, region_rows, write_png
from musc_tasks.rscin import ImageScore, ProductScores
from musc_tasks.store import PoolLayout, create_pool_store, open_pool_store

from ..references import catalogued

DATE, PRODUCT, BACKBONE = "2026-11-22", "part", "tiny"
GRID = (8, 8)
# 320 x 240 captures bounded to 100 x 75: decoded at 1/2 (160 x 120), then resized as before.
POLICY = OutputPolicy(heatmap_format="png", long_side=100, full_resolution_top=2)
# name: (score, EXIF orientation); b is flagged (rank 1, full size), c is rank 2 (full size, not
# flagged), the others are bounded; e is stored 320 x 240 and shown 240 x 320; f is a PNG.
CAPTURES = {
    "a.jpg": (1.0, 1),
    "b.jpg": (5.0, 1),
    "c.jpg": (2.0, 1),
    "d.jpg": (1.2, 1),
    "e.jpg": (1.5, 6),
    "f.png": (1.1, 1),
}
IMAGE_THRESHOLD, PIXEL_THRESHOLD = 3.0, 1.0


def _photo(rng, height=240, width=320):
    y, x = np.mgrid[0:height, 0:width] / width
    phase = rng.uniform(0, 6)
    base = np.stack([128 + 90 * np.sin(7 * x + phase), 128 + 90 * np.cos(5 * y - 3 * x), 200 * x * (1 - y)], -1)
    return np.clip(base + rng.normal(0.0, 4.0, (height, width, 1)), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def night(tmp_path_factory):
    """A product of six captures, its pool store of patch maps and its scores."""
    root = tmp_path_factory.mktemp("reduced")
    rng = np.random.default_rng(3)
    records, maps, images = [], [], []
    for index, (name, (score, orientation)) in enumerate(CAPTURES.items()):
        path = root / "input" / PRODUCT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        exif = Image.Exif()
        if orientation != 1:
            exif[0x0112] = orientation
        Image.fromarray(_photo(rng)).save(path, exif=exif, **({"quality": 90} if name.endswith(".jpg") else {}))
        patch_map = rng.normal(0.0, 0.3, GRID)
        patch_map[2:4, 5:7] += 2.5 if name == "b.jpg" else 0.9  # b's defect; the others' weaker blobs
        patch_map[6, 1] += 1.8 if name == "b.jpg" else 0.0  # a second region of b
        maps.append(patch_map.astype(np.float16))
        upright = (240, 320) if orientation == 6 else (320, 240)
        records.append(catalogued(path, name, upright))
        images.append(ImageScore(f"id-{name}", index, len(CAPTURES), score, score))
    pool = root / "pool.zarr"
    create_pool_store(pool, PoolLayout(tuple(r.image_id for r in records), GRID, 1, 4), {})
    open_pool_store(pool, "r+")["patch_scores"][:] = np.stack(maps).reshape(len(maps), -1).astype(np.float32)
    scores = ProductScores(
        PRODUCT, IMAGE_THRESHOLD, PIXEL_THRESHOLD, float(np.min(maps)), float(np.max(maps)), tuple(images)
    )
    return root, records, dict(zip((r.image_id for r in records), maps)), scores, pool


def _publish(night, out_dir, blocks):
    root, records, _, scores, pool = night
    plan = ProductPlan.make(
        out_dir, DATE, PRODUCT, records, scores, [pool], backbone_key=BACKBONE, run_id="r", outputs=POLICY
    )
    published = [publish_block(plan, start, stop) for start, stop in blocks]
    return plan, published, finish_product(plan, published)


def _published_before(plan, maps, record, scratch):
    """What publish wrote before reduced decodes: mask PNG bytes, regions, rule, level, mask, overlay, full size."""
    image, _ = read_rgb(record.path)
    patch_map = maps[record.image_id]
    pixel_scores = upsample_map(patch_map, (image.height, image.width))
    flagged = CAPTURES[record.relpath][0] > IMAGE_THRESHOLD
    mask, rule, level = image_mask(pixel_scores, plan.scores.pixel_threshold, flagged=flagged)
    regions = region_rows(mask, pixel_scores)
    full_size = flagged or plan.ranks[record.image_id] <= POLICY.full_resolution_top
    overlay = _overlay(
        image, image.size, patch_map, pixel_scores, mask, regions, plan.scores, POLICY, full_size=full_size
    )
    mask_bytes = write_png(scratch / "mask.png", np.where(mask, np.uint8(255), np.uint8(0))).read_bytes()
    return mask_bytes, regions, rule, level, mask, overlay, full_size


def _psnr(a, b):
    error = np.mean((np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2)
    return np.inf if error == 0 else 10 * np.log10(255.0**2 / error)


@pytest.fixture(scope="module")
def published(night, tmp_path_factory):
    """The night published in one block: (OUT, plan, blocks' rows, product rows)."""
    out = tmp_path_factory.mktemp("published")
    return (out, *_publish(night, out, [(0, len(CAPTURES))]))


def test_masks_regions_and_maps_equal_those_of_full_decodes(night, published, tmp_path):
    _, records, maps, *_ = night
    out, plan, published, rows = published
    by_path = {r["path"]: r for r in rows.scores}
    assert published[0].sizes == [(i, r.height, r.width) for i, r in enumerate(records)]
    assert [r["flagged"] for r in rows.scores] == [name == "b.jpg" for name in CAPTURES]
    psnr = {}
    for record in records:
        mask_bytes, regions, rule, level, mask, overlay, full_size = _published_before(plan, maps, record, tmp_path)
        row = by_path[record.path]
        assert Path(row["mask_path"]).read_bytes() == mask_bytes, record.relpath
        assert (row["anomalous_fraction"], row["mask_level"]) == (float(mask.mean()), level)
        ours = [r for r in rows.regions if r["path"] == record.path]
        assert [{k: r[k] for k in regions} for r in ours] == [
            {k: v[i].item() for k, v in regions.items()} for i in range(len(regions["region"]))
        ]
        assert all(r["region_rule"] == rule for r in ours)
        heatmap = Path(row["heatmap_path"]).read_bytes()
        if full_size or record.relpath.endswith(".png"):  # decoded whole, as before: the same bytes
            assert heatmap == encode_image(overlay, "png", POLICY.heatmap_quality), record.relpath
        else:  # decoded at 1/2, then resized as before: the same size, nearly the same pixels
            with Image.open(io.BytesIO(heatmap)) as drawn:
                assert drawn.size == bounded_size((record.width, record.height), POLICY.long_side)
                psnr[record.relpath] = _psnr(drawn, overlay)
        # the maps store: the stored map upsampled is what the mask was cut from
        score_map, _ = read_map(out, DATE, PRODUCT, record.relpath)
        assert score_map.shape == (record.height, record.width)
        np.testing.assert_array_equal(score_map > (np.inf if level is None else level), mask)
    assert sorted(psnr) == ["a.jpg", "d.jpg", "e.jpg"]
    assert min(psnr.values()) > 45, psnr  # 52.6 dB
    assert len(rows.regions) == 2


def test_a_rerun_in_other_blocks_writes_the_same_bytes(night, published, tmp_path):
    _, records, *_ = night
    first, _, _, rows_first = published
    second = tmp_path / "second"
    _, _, rows_second = _publish(night, second, [(0, 2), (2, 5), (5, len(records))])
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert {PurePosixPath(p).parts[0] for p in files} == {"masks", "heatmaps", "crops", "maps"}
    assert files == sorted(p.relative_to(second) for p in second.rglob("*") if p.is_file())
    assert all((first / p).read_bytes() == (second / p).read_bytes() for p in files)
    strip = lambda rows, out: [{k: str(v).replace(str(out), "") for k, v in r.items()} for r in rows]  # noqa: E731
    assert strip(rows_first.scores, first) == strip(rows_second.scores, second)
    assert strip(rows_first.regions, first) == strip(rows_second.regions, second)
    np.testing.assert_array_equal(
        read_map(first, DATE, PRODUCT, "e.jpg")[0], read_map(second, DATE, PRODUCT, "e.jpg")[0]
    )


def test_a_products_pools_are_read_once_by_its_plan(night, published, tmp_path, monkeypatch):
    """Publish tasks and the maps store take the maps from the plan: no task opens a pool store."""
    _, records, _, scores, pool = night
    first, *_ = published
    plan = ProductPlan.make(
        tmp_path, DATE, PRODUCT, records, scores, [pool], backbone_key=BACKBONE, run_id="r", outputs=POLICY
    )

    def refuse(*_):
        raise AssertionError("a publish task opened a pool store")

    for name in ("open_pool_store", "pool_layout", "pool_reference"):
        monkeypatch.setattr(publish, name, refuse)
    finish_product(plan, [publish_block(plan, start, stop) for start, stop in ((0, 3), (3, len(records)))])
    files = sorted(p.relative_to(first) for p in first.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert all((first / p).read_bytes() == (tmp_path / p).read_bytes() for p in files)

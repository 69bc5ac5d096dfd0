"""Region crops: one JPEG of the capture around each row of the regions table, nothing else.

The crop box is checked exactly against its definition; the crop files against the capture's
upright pixels (JPEG tolerance), the rows, a re-run in other blocks and a re-run that finds
fewer regions.
"""

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from musc_tasks.config import OutputPolicy
from musc_tasks.imageio import read_rgb
from musc_tasks.publish import ProductPlan, finish_product, output_relpath, publish_block
from musc_tasks.render import CROP_MARGIN_PX, CROP_MIN_SIDE, crop_box
from musc_tasks.rscin import ImageScore, ProductScores
from musc_tasks.store import PoolLayout, create_pool_store, open_pool_store

from ..references import catalogued

DATE, PRODUCT, BACKBONE = "2026-11-22", "part", "tiny"
GRID = (8, 8)
WIDTH, HEIGHT = 640, 480  # stored size; EXIF orientation 6 shows it 480 x 640
# name: (score, EXIF orientation, planted patches); flagged above 3.0. "b" has a large
# region and a one-patch one at the corner; "r" is rotated by its EXIF tag; "c" is not flagged.
CAPTURES = {
    "a.jpg": (1.0, 1, ()),
    "b.jpg": (5.0, 1, ((slice(2, 5), slice(3, 7)), (slice(7, 8), slice(0, 1)))),
    "c.jpg": (2.0, 1, ((slice(3, 4), slice(3, 4)),)),
    "sub/r.jpg": (4.0, 6, ((slice(1, 2), slice(6, 7)),)),
}
IMAGE_THRESHOLD, PIXEL_THRESHOLD = 3.0, 1.5


def _side(side: int, length: int) -> int:
    """The crop's side on one axis: the definition in crop_box's docstring."""
    return min(length, max(CROP_MIN_SIDE, side + 2 * max(CROP_MARGIN_PX, -(-side // 4))))


@pytest.mark.parametrize(
    ("bbox", "size", "expected"),
    [
        ((500, 400, 504, 403), (1000, 800), (374, 273, 630, 529)),  # tiny, centred
        ((0, 0, 3, 3), (1000, 800), (0, 0, 256, 256)),  # at the corner: moved inside, full size
        ((995, 790, 1000, 800), (1000, 800), (744, 544, 1000, 800)),  # the other corner
        ((10, 20, 30, 40), (100, 200), (0, 0, 100, 200)),  # capture smaller than a crop: all of it
        ((200, 100, 600, 300), (2000, 1000), (100, 50, 700, 350)),  # large: a quarter each side
    ],
)
def test_crop_box_examples(bbox, size, expected):
    assert crop_box(bbox, size) == expected


def test_crop_box_contains_the_region_inside_the_capture():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        width, height = (int(v) for v in rng.integers(1, 1500, 2))
        x0, x1 = sorted(int(v) for v in rng.choice(width + 1, 2, replace=False))
        y0, y1 = sorted(int(v) for v in rng.choice(height + 1, 2, replace=False))
        left, top, right, bottom = crop_box((x0, y0, x1, y1), (width, height))
        assert 0 <= left <= x0 < x1 <= right <= width and 0 <= top <= y0 < y1 <= bottom <= height
        assert (right - left, bottom - top) == (_side(x1 - x0, width), _side(y1 - y0, height))
        # centred on the region, to the pixel, unless an edge of the capture is in the way
        if left > 0 and right < width:
            assert abs((left + right) - (x0 + x1)) <= 1


@pytest.mark.parametrize("bbox", [(5, 5, 5, 9), (-1, 0, 3, 3), (0, 0, 11, 3)])
def test_crop_box_refuses_a_box_outside_or_empty(bbox):
    with pytest.raises(ValueError, match="inside the 10 x 10 capture"):
        crop_box(bbox, (10, 10))


def _photo(rng):
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH] / WIDTH
    phase = rng.uniform(0, 6)
    base = np.stack([128 + 90 * np.sin(17 * x + phase), 128 + 90 * np.cos(11 * y - 3 * x), 200 * x * (1 - y)], -1)
    return np.clip(base + rng.normal(0.0, 3.0, (HEIGHT, WIDTH, 1)), 0, 255).astype(np.uint8)


def _night(root: Path, scores_by_name: dict[str, float]):
    rng = np.random.default_rng(5)
    records, maps, images = [], [], []
    for index, (name, (_, orientation, planted)) in enumerate(CAPTURES.items()):
        path = root / "input" / PRODUCT / name
        path.parent.mkdir(parents=True, exist_ok=True)
        exif = Image.Exif()
        if orientation != 1:
            exif[0x0112] = orientation
        if not path.exists():
            Image.fromarray(_photo(rng)).save(path, exif=exif, quality=92)
        patch_map = np.full(GRID, 0.2) + np.random.default_rng(index).normal(0.0, 0.1, GRID)
        for patch in planted:
            patch_map[patch] += 3.0
        maps.append(patch_map.astype(np.float16))
        upright = (HEIGHT, WIDTH) if orientation == 6 else (WIDTH, HEIGHT)
        records.append(catalogued(path, name, upright))
        score = scores_by_name[name]
        images.append(ImageScore(f"id-{name}", index, len(CAPTURES), score, score))
    pool = root / "pool.zarr"
    if not pool.exists():
        create_pool_store(pool, PoolLayout(tuple(r.image_id for r in records), GRID, 1, 4), {})
        open_pool_store(pool, "r+")["patch_scores"][:] = np.stack(maps).reshape(len(maps), -1).astype(np.float32)
    scores = ProductScores(
        PRODUCT, IMAGE_THRESHOLD, PIXEL_THRESHOLD, float(np.min(maps)), float(np.max(maps)), tuple(images)
    )
    return records, scores, pool


def _publish(root, out_dir, blocks, scores_by_name=None):
    records, scores, pool = _night(root, scores_by_name or {n: s for n, (s, *_) in CAPTURES.items()})
    plan = ProductPlan.make(
        out_dir, DATE, PRODUCT, records, scores, [pool], backbone_key=BACKBONE, run_id="r", outputs=OutputPolicy()
    )
    return records, finish_product(plan, [publish_block(plan, start, stop) for start, stop in blocks])


def _crop_files(out_dir: Path) -> list[Path]:
    return sorted(p for p in (out_dir / "crops").rglob("*") if p.is_file())


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("crops")
    out_dir = root / "out"
    records, rows = _publish(root, out_dir, [(0, len(CAPTURES))])
    return root, out_dir, records, rows


def test_a_crop_for_each_region_row_of_the_capture_pixels(published):
    _, out_dir, records, rows = published
    flagged = [r["path"] for r in rows.scores if r["flagged"]]
    assert len(flagged) == 2 and len(rows.regions) == 3  # b: 2 regions, r: 1
    assert {r["path"] for r in rows.regions} == set(flagged)
    # exactly one file per row, and no other file
    assert _crop_files(out_dir) == sorted(Path(r["crop_path"]) for r in rows.regions)
    by_path = {r.path: r for r in records}
    for row in rows.regions:
        record = by_path[row["path"]]
        expected = output_relpath("crops", DATE, PRODUCT, BACKBONE, record.relpath, keep_suffix=False, suffix="")
        assert row["crop_path"] == str(out_dir.absolute() / expected / f"{row['region']}.jpg")
        capture, _ = read_rgb(record.path)  # upright: EXIF orientation applied
        assert capture.size == (record.width, record.height)
        bbox = (row["bbox_x0"], row["bbox_y0"], row["bbox_x1"], row["bbox_y1"])
        box = crop_box(bbox, capture.size)
        with Image.open(row["crop_path"]) as crop:
            assert crop.format == "JPEG" and crop.size == (box[2] - box[0], box[3] - box[1])
            pixels = np.asarray(crop.convert("RGB"), np.float64)
        expected_pixels = np.asarray(capture, np.float64)[box[1] : box[3], box[0] : box[2]]
        error = np.abs(pixels - expected_pixels)
        # quality 95: a mean error near 1 level; a crop from elsewhere or unrotated is off by tens
        assert error.mean() < 2.0 and np.percentile(error, 99) < 12, (row["crop_path"], error.mean())
    rotated = [r for r in rows.regions if r["path"].endswith("r.jpg")]
    assert rotated and all(Path(r["crop_path"]).parent.name == "r" for r in rotated)


def test_a_rerun_in_other_blocks_writes_the_same_crops(published, tmp_path):
    root, first, _, rows_first = published
    second = tmp_path / "second"
    _, rows_second = _publish(root, second, [(0, 1), (1, 3), (3, len(CAPTURES))])
    files = [p.relative_to(first) for p in _crop_files(first)]
    assert files == [p.relative_to(second) for p in _crop_files(second)]
    assert all((first / p).read_bytes() == (second / p).read_bytes() for p in files)
    strip = lambda rows, out: [{**r, "crop_path": r["crop_path"].replace(str(out), "")} for r in rows]  # noqa: E731
    assert strip(rows_first.regions, first) == strip(rows_second.regions, second)


def test_a_rerun_with_fewer_regions_leaves_only_their_crops(published, tmp_path):
    root, first, _, _ = published
    out_dir = tmp_path / "out"
    _publish(root, out_dir, [(0, len(CAPTURES))])
    b_folder = out_dir / output_relpath("crops", DATE, PRODUCT, BACKBONE, "b.jpg", keep_suffix=False, suffix="")
    r_folder = out_dir / output_relpath("crops", DATE, PRODUCT, BACKBONE, "sub/r.jpg", keep_suffix=False, suffix="")
    # an older run's third region of b, and the crops of an image in a folder named like b's
    (b_folder / "3.jpg").write_bytes(b"old")
    nested = b_folder / "deeper" / "1.jpg"
    nested.parent.mkdir()
    nested.write_bytes(b"another image's crop")
    # the re-run: r is no longer flagged, b keeps its 2 regions
    _, rows = _publish(
        root, out_dir, [(0, len(CAPTURES))], {**{n: s for n, (s, *_) in CAPTURES.items()}, "sub/r.jpg": 2.5}
    )
    assert [r["path"].rsplit("/", 1)[1] for r in rows.regions] == ["b.jpg", "b.jpg"]
    (corner,) = [r["region"] for r in rows.regions if r["bbox_x0"] == 0]
    assert not r_folder.exists()
    assert sorted(p.name for p in b_folder.iterdir()) == ["1.jpg", "2.jpg", "deeper"]
    assert nested.read_bytes() == b"another image's crop"
    assert (b_folder / "1.jpg").read_bytes() == (first / b_folder.relative_to(out_dir) / "1.jpg").read_bytes()
    with Image.open(io.BytesIO((b_folder / f"{corner}.jpg").read_bytes())) as crop:
        assert crop.size == (CROP_MIN_SIDE, CROP_MIN_SIDE)  # the one-patch region at the corner

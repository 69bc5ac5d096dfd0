"""Region rows, masks, heatmaps and PNG writing."""

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from PIL import Image

from musc_tasks.render import HEATMAP_ANCHORS, heatmap_overlay, image_mask, ramp_colours, region_rows, write_png


def _two_regions():
    """A 6 x 8 mask: a diagonal-only staircase (one region under 8-connectivity) and a bar."""
    mask = np.zeros((6, 8), bool)
    mask[0, 0] = mask[1, 1] = mask[2, 2] = True  # touch only at corners
    mask[2, 1] = True
    mask[4, 4:8] = True
    score_map = np.zeros((6, 8))
    score_map[0, 0], score_map[1, 1], score_map[2, 2], score_map[2, 1] = 0.2, 0.4, 0.6, 0.8
    score_map[4, 4:8] = [0.9, 0.5, 0.5, 0.1]
    return mask, score_map


def test_region_rows_hand_made():
    mask, score_map = _two_regions()
    rows = region_rows(mask, score_map)
    # Worked out by hand: the bar has the higher max (0.9) so it is region 1.
    assert_array_equal(rows["region"], [1, 2])
    assert_array_equal(rows["bbox_x0"], [4, 0])
    assert_array_equal(rows["bbox_y0"], [4, 0])
    assert_array_equal(rows["bbox_x1"], [8, 3])
    assert_array_equal(rows["bbox_y1"], [5, 3])
    assert_array_equal(rows["area_px"], [4, 4])
    assert_allclose(rows["area_fraction"], [4 / 48, 4 / 48])
    assert_allclose(rows["max_score"], [0.9, 0.8])
    assert_allclose(rows["mean_score"], [0.5, 0.5])
    # Staircase pixels (row, col): (0,0) (1,1) (2,2) (2,1).
    assert_allclose(rows["centroid_x"], [5.5, (0 + 1 + 2 + 1) / 4])
    assert_allclose(rows["centroid_y"], [4.0, (0 + 1 + 2 + 2) / 4])
    assert rows["region"].dtype == np.int32 and rows["bbox_x0"].dtype == np.int32
    assert rows["area_px"].dtype == np.int64 and rows["max_score"].dtype == np.float64


def test_region_rows_ties_keep_label_order():
    mask = np.zeros((3, 5), bool)
    mask[1, 0] = mask[1, 4] = True
    rows = region_rows(mask, np.ones((3, 5)))
    assert_array_equal(rows["bbox_x0"], [0, 4])


def test_region_rows_empty_mask():
    rows = region_rows(np.zeros((4, 4), bool), np.zeros((4, 4), np.float32))
    assert len(rows) == 11
    assert all(column.shape == (0,) for column in rows.values())
    assert rows["region"].dtype == np.int32 and rows["area_px"].dtype == np.int64
    assert rows["centroid_x"].dtype == np.float64


def test_region_rows_rejects_bad_input():
    with pytest.raises(ValueError, match="mask"):
        region_rows(np.zeros((4, 4), np.uint8), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="score_map"):
        region_rows(np.zeros((4, 4), bool), np.zeros((4, 5)))


@pytest.mark.parametrize("shape", [(5, 7), (5, 7, 3)])
def test_write_png_round_trip_and_determinism(tmp_path, shape):
    pixels = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    first = write_png(tmp_path / "a" / "b" / "x.png", pixels)
    first_bytes = first.read_bytes()
    second = write_png(tmp_path / "a" / "b" / "x.png", pixels)
    assert second.read_bytes() == first_bytes
    with Image.open(first) as image:
        assert_array_equal(np.asarray(image), pixels)
    assert [path.name for path in first.parent.iterdir()] == ["x.png"]  # no temp file left


def test_write_png_rejects_bad_pixels(tmp_path):
    with pytest.raises(ValueError, match="pixels"):
        write_png(tmp_path / "x.png", np.zeros((4, 4), np.float32))
    with pytest.raises(ValueError, match="pixels"):
        write_png(tmp_path / "x.png", np.zeros((4, 4, 4), np.uint8))


def test_heatmap_overlay_colours_only_above_the_floor():
    image = np.full((4, 6, 3), 128, np.uint8)
    score_map = np.tile(np.linspace(0.0, 1.0, 6), (4, 1))
    overlay = heatmap_overlay(image, score_map, floor=0.5, vmax=1.0)
    assert overlay.shape == (4, 6, 3) and overlay.dtype == np.uint8
    assert_array_equal(overlay[:, :3], image[:, :3])  # at or below the floor: the image, not darkened
    low, high = overlay[0, 3].astype(int), overlay[0, -1].astype(int)
    assert np.abs(high - low).sum() > 100
    assert high.sum() > low.sum()  # the ramp gets brighter with the score
    assert_array_equal(heatmap_overlay(image, score_map, floor=0.0, vmax=1.0, alpha=0.0), image)


def test_heatmap_overlay_non_finite_scores_as_before():
    """NaN is below the floor, +inf at the top of the ramp, -inf below: as when NaN became -inf first."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)
    score_map = rng.normal(0.0, 1.0, (5, 7)).astype(np.float32)
    score_map[0, :3] = [np.nan, np.inf, -np.inf]
    for floor, vmax in ((0.0, 1.5), (0.0, 0.0), (-1.0, 1e-3)):
        overlay = heatmap_overlay(image, score_map, floor=floor, vmax=vmax)
        scores = np.nan_to_num(score_map.astype(np.float64), nan=-np.inf)  # the former rule
        above = scores > floor
        values = scores[above]
        fraction = np.clip((values - floor) / (vmax - floor), 0, 1) if vmax > floor else np.ones_like(values)
        expected = image.copy()
        expected[above] = np.clip(np.rint((1.0 - 0.6) * image[above] + 0.6 * ramp_colours(fraction)), 0, 255)
        assert_array_equal(overlay, expected)
        assert_array_equal(overlay[0, 0], image[0, 0])
        top = np.rint((1.0 - 0.6) * image[0, 1] + 0.6 * HEATMAP_ANCHORS[-1, 1:])
        assert_array_equal(overlay[0, 1], top.astype(np.uint8))


def test_ramp_lightness_increases():
    from musc_tasks.render import ramp_colours

    rgb = ramp_colours(np.linspace(0.0, 1.0, 50))
    luma = rgb @ np.array([0.2126, 0.7152, 0.0722])
    assert (np.diff(luma) > 0).all()


def test_heatmap_overlay_flat_and_clipped():
    image = np.zeros((3, 3, 3), np.uint8)
    flat = heatmap_overlay(image, np.random.default_rng(1).random((3, 3)) + 1.5, floor=1.0, vmax=1.0)
    assert (flat == flat[0, 0]).all()
    clipped = heatmap_overlay(image, np.array([[0.5, 1.0, 10.0]] * 3), floor=0.0, vmax=1.0, alpha=1.0)
    assert_array_equal(clipped[:, 1], clipped[:, 2])


def test_heatmap_overlay_draws_contour_and_boxes():
    from musc_tasks.render import BOX_RGB, CONTOUR_RGB

    image = np.zeros((20, 20, 3), np.uint8)
    mask = np.zeros((20, 20), bool)
    mask[5:10, 5:10] = True
    overlay = heatmap_overlay(image, mask * 1.0, floor=0.5, vmax=1.0, mask=mask, boxes=np.array([[5, 5, 10, 10]]))
    assert_array_equal(overlay[5, 7], CONTOUR_RGB)  # mask edge
    assert not (overlay[7, 7] == CONTOUR_RGB).all()  # inside: coloured, not contour
    assert_array_equal(overlay[4, 7], BOX_RGB)  # the box just outside the region
    assert_array_equal(overlay[10, 4], BOX_RGB)
    assert_array_equal(overlay[0, 0], image[0, 0])


def test_encode_image_formats_are_deterministic():
    from io import BytesIO

    from PIL import Image

    from musc_tasks.render import encode_image

    pixels = np.random.default_rng(0).integers(0, 256, (32, 48, 3), dtype=np.uint8)
    for image_format, quality in (("jpeg", 85), ("webp", 80), ("webp", 100), ("png", 0)):
        data = encode_image(pixels, image_format, quality)
        assert data == encode_image(pixels, image_format, quality)
        with Image.open(BytesIO(data)) as decoded:
            assert decoded.size == (48, 32)
            if quality in (0, 100):  # the lossless options
                assert_array_equal(np.asarray(decoded.convert("RGB")), pixels)


def test_legend_is_an_image():
    from musc_tasks.render import heatmap_legend

    legend = heatmap_legend(0.2, 0.9)
    assert legend.shape == (120, 480, 3) and legend.dtype == np.uint8
    assert_array_equal(legend, heatmap_legend(0.2, 0.9))


def test_heatmap_overlay_rejects_shape_mismatch():
    with pytest.raises(ValueError, match="score_map"):
        heatmap_overlay(np.zeros((4, 4, 3), np.uint8), np.zeros((4, 5)), floor=0.0, vmax=1.0)
    with pytest.raises(ValueError, match="image_rgb"):
        heatmap_overlay(np.zeros((4, 4), np.uint8), np.zeros((4, 4)), floor=0.0, vmax=1.0)


def exactly_above(score_map, level):
    """Pixel by pixel, in exact arithmetic (float32 and float64 values compared as reals)."""
    return np.array([[float(x) > float(level) for x in row] for row in score_map])


def random_map(seed, shape=(9, 13)):
    return np.random.default_rng(seed).gamma(2.0, 0.1, size=shape).astype(np.float32)


def test_an_image_that_is_not_flagged_has_no_mask():
    mask, rule, level = image_mask(random_map(0), 0.0, flagged=False)
    assert mask.shape == (9, 13) and mask.dtype == bool and not mask.any()
    assert rule is None and level is None


@pytest.mark.parametrize("seed", range(6))
def test_pixels_above_the_pixel_threshold_exactly(seed):
    score_map = random_map(seed)
    x = np.float32(np.sort(score_map.ravel())[-4])
    # just below a pixel's value, at it and just above (all round to it in float32)
    for threshold in (float(x) - 1e-12, float(x), float(x) + 1e-12):
        mask, rule, level = image_mask(score_map, threshold, flagged=True)
        assert rule == "pixel_threshold"
        assert_array_equal(mask, exactly_above(score_map, threshold))
        assert np.float32(level) == level  # a float32 value: the same pixels in either precision
        assert_array_equal(score_map > level, mask)
        assert_array_equal(score_map.astype(np.float64) > np.float64(level), mask)


@pytest.mark.parametrize("seed", range(6))
def test_a_flagged_image_below_the_pixel_threshold_keeps_its_peak(seed):
    score_map = random_map(seed)
    values = sorted(float(v) for v in score_map.ravel())
    peak, median = values[-1], values[len(values) // 2]  # 117 pixels: the middle one
    mask, rule, level = image_mask(score_map, peak + 0.01, flagged=True)
    assert rule == "peak"
    assert_array_equal(mask, exactly_above(score_map, median + 0.5 * (peak - median)))
    assert mask[np.unravel_index(np.argmax(score_map), score_map.shape)]
    assert np.float32(level) == level
    assert_array_equal(score_map > level, mask)


def test_a_flat_flagged_map_keeps_its_peak():
    score_map = np.full((4, 5), 0.25, np.float32)
    score_map[0, 0] = 0.2
    mask, rule, level = image_mask(score_map, 0.9, flagged=True)
    assert rule == "peak" and level < 0.25
    assert mask.sum() == 19
    with pytest.raises(ValueError, match="pixel_threshold"):
        image_mask(score_map, float("inf"), flagged=True)

"""Tests for musc_tasks.core._metrics against scikit-learn and slow references."""

import bisect

import numpy as np
import pytest
from scipy import ndimage
from skimage import measure
from sklearn.metrics import auc

from musc_tasks.core._metrics import aupro, image_metrics, pixel_metrics, pro_musc

from ..references import sklearn_metrics

TOL = 1e-9


# --------------------------------------------------------------------------
# slow references


def _ref_aupro(maps, masks, fpr_limit=0.3):
    regions = []
    for i in range(maps.shape[0]):
        lab, n = ndimage.label(masks[i], structure=np.ones((3, 3)))
        regions += [(i, lab == r) for r in range(1, n + 1)]
    normal = ~masks
    fprs, pros = [0.0], [0.0]
    for t in np.unique(maps)[::-1]:
        detected = maps >= t
        pros.append(np.mean([detected[i][region].mean() for i, region in regions]))
        fprs.append(detected[normal].sum() / normal.sum())
    fprs.append(1.0)
    pros.append(1.0)
    x = np.minimum(fprs, 1.0)
    y = np.minimum(pros, 1.0)
    area = 0.0
    for i in range(1, len(x)):
        if x[i] <= fpr_limit:
            area += (x[i] - x[i - 1]) * (y[i] + y[i - 1]) / 2
    if fpr_limit not in x:
        ins = bisect.bisect(list(x), fpr_limit)
        y_at = y[ins - 1] + (y[ins] - y[ins - 1]) * (fpr_limit - x[ins - 1]) / (x[ins] - x[ins - 1])
        area += (y_at + y[ins - 1]) * (fpr_limit - x[ins - 1]) / 2
    return area / fpr_limit


def _ref_pro_musc(maps, masks, steps=200, fpr_limit=0.3):
    lo, hi = maps.min(), maps.max()
    delta = (hi - lo) / steps
    pros, fprs = [], []
    normal = ~masks
    for th in np.arange(lo, hi, delta):
        binary = maps > th
        overlaps = []
        for binary_map, mask in zip(binary, masks):
            for region in measure.regionprops(measure.label(mask)):
                rows, cols = region.coords[:, 0], region.coords[:, 1]
                overlaps.append(binary_map[rows, cols].sum() / region.area)
        pros.append(np.array(overlaps).mean())
        fprs.append(np.logical_and(normal, binary).sum() / normal.sum())
    pros, fprs = np.array(pros), np.array(fprs)
    keep = fprs < fpr_limit
    x = fprs[keep]
    x = (x - x.min()) / (x.max() - x.min())
    return auc(x, pros[keep])


# --------------------------------------------------------------------------
# fixtures


def _blob_masks():
    masks = np.zeros((4, 16, 16), dtype=bool)
    masks[0, 2:6, 3:8] = True
    masks[0, 10:14, 10:12] = True  # second region in the same image
    masks[1, 4:7, 4:7] = True
    masks[1, 7:9, 7:10] = True  # touches the block above only diagonally
    # image 2 is fully normal
    masks[3, 0:3, 13:16] = True
    masks[3, 8, 2] = True  # single-pixel region
    return masks


def _blob_maps(masks, seed, *, decimals=None, dtype=np.float64):
    rng = np.random.default_rng(seed)
    maps = rng.random(masks.shape) + 0.6 * masks
    if decimals is not None:
        maps = np.round(maps, decimals)
    return maps.astype(dtype)


# --------------------------------------------------------------------------
# image and pixel metrics vs scikit-learn


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n", [7, 60, 500])
@pytest.mark.parametrize("decimals", [None, 1])
def test_image_metrics_match_sklearn(seed, n, decimals):
    rng = np.random.default_rng(seed)
    labels = rng.random(n) < 0.4
    labels[:2] = [True, False]
    scores = rng.random(n) + 0.3 * labels
    if decimals is not None:
        scores = np.round(scores, decimals)
    got = image_metrics(scores, labels.astype(int))
    want = sklearn_metrics(scores, labels)
    assert set(got) == {"auroc", "ap", "f1_max"}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=TOL), key
        assert isinstance(got[key], float)


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("decimals", [None, 1, 2])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pixel_metrics_match_sklearn(seed, decimals, dtype):
    masks = _blob_masks()
    maps = _blob_maps(masks, seed, decimals=decimals, dtype=dtype)
    got = pixel_metrics(maps, masks, pro=False)
    want = sklearn_metrics(maps.ravel(), masks.ravel())
    assert set(got) == {"auroc", "ap", "f1_max"}
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=TOL), key


def test_pixel_metrics_pro_keys_match_standalone_functions():
    masks = _blob_masks()
    maps = _blob_maps(masks, 3, decimals=2, dtype=np.float32)
    got = pixel_metrics(maps, masks)
    assert set(got) == {"auroc", "ap", "f1_max", "aupro", "pro_musc"}
    assert got["aupro"] == pytest.approx(aupro(maps, masks), abs=1e-12)
    assert got["pro_musc"] == pytest.approx(pro_musc(maps, masks), abs=1e-12)
    got = pixel_metrics(maps, masks, fpr_limit=0.5, steps=50)
    assert got["aupro"] == pytest.approx(aupro(maps, masks, fpr_limit=0.5), abs=1e-12)
    assert got["pro_musc"] == pytest.approx(pro_musc(maps, masks, steps=50, fpr_limit=0.5), abs=1e-12)


def test_integer_masks_accepted():
    masks = _blob_masks()
    maps = _blob_maps(masks, 0)
    assert pixel_metrics(maps, masks.astype(np.uint8)) == pixel_metrics(maps, masks)


# --------------------------------------------------------------------------
# AUPRO


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("fpr_limit", [0.3, 0.05, 1.0])
def test_aupro_matches_reference(seed, decimals, fpr_limit):
    masks = _blob_masks()
    maps = _blob_maps(masks, seed, decimals=decimals)
    want = _ref_aupro(maps, masks, fpr_limit)
    assert aupro(maps, masks, fpr_limit=fpr_limit) == pytest.approx(want, abs=TOL)


def test_aupro_fpr_limit_hitting_a_curve_point():
    # With 8 normal pixels every FPR is a multiple of 1/8, so 0.25 is on the curve.
    rng = np.random.default_rng(5)
    masks = np.zeros((1, 4, 4), dtype=bool)
    masks[0, :2, :] = True
    maps = rng.random((1, 4, 4))
    want = _ref_aupro(maps, masks, 0.25)
    assert aupro(maps, masks, fpr_limit=0.25) == pytest.approx(want, abs=TOL)


def test_aupro_hand_computed_with_tie():
    # Regions {0} and {3, 4}; normals 1, 2. The tie at 0.6 between a normal
    # and an anomalous pixel gives a sloped segment (0, .5) -> (.5, .75):
    # curve (0,0) (0,.5) (.5,.75) (1,.75) (1,1) (1,1).
    maps = np.array([[[0.9, 0.6, 0.2, 0.6, 0.1]]])
    masks = np.array([[[1, 0, 0, 1, 1]]], dtype=bool)
    # PRO(0.3) = .5 + .25 * .3 / .5 = .65; area = .3 * (.5 + .65) / 2
    assert aupro(maps, masks) == pytest.approx(0.1725 / 0.3, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=0.5) == pytest.approx(0.3125 / 0.5, abs=1e-12)
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(0.6875, abs=1e-12)


def test_aupro_uses_eight_connectivity():
    # The diagonal pair forms one region of 3 pixels; with 4-connectivity the
    # top pixel would be a region of its own and the result would be 1/2.
    masks = np.array([[[1, 0, 0], [0, 1, 1], [0, 0, 0]]], dtype=bool)
    maps = np.array([[[0.9, 0.5, 0.6], [0.7, 0.05, 0.04], [0.3, 0.2, 0.1]]])
    assert aupro(maps, masks, fpr_limit=1.0) == pytest.approx(1 / 3, abs=1e-12)
    assert aupro(maps, masks) == pytest.approx(1 / 3, abs=1e-12)


def test_aupro_all_equal_scores_is_the_diagonal():
    masks = _blob_masks()
    maps = np.full(masks.shape, 0.5, dtype=np.float32)
    # Curve (0,0) -> (1,1): area .3 * .3 / 2 over .3.
    assert aupro(maps, masks) == pytest.approx(0.15, abs=1e-12)


# --------------------------------------------------------------------------
# MuSc PRO


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [None, 1])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_pro_musc_matches_reference(seed, decimals, dtype):
    masks = _blob_masks()
    maps = _blob_maps(masks, seed, decimals=decimals, dtype=dtype)
    want = _ref_pro_musc(maps, masks)
    assert pro_musc(maps, masks) == pytest.approx(want, abs=TOL)


@pytest.mark.parametrize("steps, fpr_limit", [(10, 0.3), (37, 0.6), (200, 1.0)])
def test_pro_musc_options_match_reference(steps, fpr_limit):
    masks = _blob_masks()
    maps = _blob_maps(masks, 4, dtype=np.float32)
    want = _ref_pro_musc(maps, masks, steps, fpr_limit)
    got = pro_musc(maps, masks, steps=steps, fpr_limit=fpr_limit)
    assert got == pytest.approx(want, abs=TOL)


def test_pro_musc_with_steps_plus_one_thresholds():
    lo, hi = np.float32(0.6369617), np.float32(1.4463218)
    assert np.arange(lo, hi, (hi - lo) / 200).size == 201  # float rounding
    masks = _blob_masks()
    maps = _blob_maps(masks, 6, dtype=np.float32)
    maps = lo + (maps - maps.min()) / (maps.max() - maps.min()) * (hi - lo)
    maps = maps.astype(np.float32)
    maps.flat[np.argmin(maps)], maps.flat[np.argmax(maps)] = lo, hi
    want = _ref_pro_musc(maps, masks)
    assert pro_musc(maps, masks) == pytest.approx(want, abs=TOL)


def test_pro_musc_undefined_cases_return_nan():
    masks = _blob_masks()
    assert np.isnan(pro_musc(np.ones(masks.shape), masks))  # all equal
    maps = _blob_maps(masks, 0)
    assert np.isnan(pro_musc(maps, masks, steps=1))  # a single threshold
    # All normal pixels at the minimum: every kept FPR is 0.
    maps = np.where(masks, _blob_maps(masks, 0) + 1.0, 0.0)
    assert np.isnan(pro_musc(maps, masks))


# --------------------------------------------------------------------------
# perfect detectors


def test_perfect_detector_scores_one():
    masks = _blob_masks()
    rng = np.random.default_rng(0)
    maps = rng.random(masks.shape) * 0.5 + masks
    got = pixel_metrics(maps, masks)
    for key in ("auroc", "ap", "f1_max", "aupro"):
        assert got[key] == pytest.approx(1.0, abs=1e-12), key
    got = image_metrics([0.1, 0.2, 0.9, 0.8], [0, 0, 1, 1])
    assert got == pytest.approx({"auroc": 1.0, "ap": 1.0, "f1_max": 1.0})


def test_all_equal_scores_match_sklearn():
    labels = np.array([0, 1, 0, 0, 1, 0])
    scores = np.full(6, 0.25)
    got = image_metrics(scores, labels)
    want = sklearn_metrics(scores, labels)
    for key in want:
        assert got[key] == pytest.approx(want[key], abs=TOL)
    assert got["auroc"] == 0.5


# --------------------------------------------------------------------------
# validation


def test_single_class_labels_raise():
    with pytest.raises(ValueError, match="labels"):
        image_metrics([0.1, 0.2, 0.3], [1, 1, 1])
    with pytest.raises(ValueError, match="labels"):
        image_metrics([0.1, 0.2, 0.3], [False, False, False])


@pytest.mark.parametrize("func", [pixel_metrics, aupro, pro_musc])
def test_single_class_masks_raise(func):
    maps = np.random.default_rng(0).random((2, 4, 4))
    with pytest.raises(ValueError, match="masks"):
        func(maps, np.zeros((2, 4, 4), dtype=bool))
    with pytest.raises(ValueError, match="masks"):
        func(maps, np.ones((2, 4, 4), dtype=bool))


@pytest.mark.parametrize("func", [pixel_metrics, aupro, pro_musc])
def test_pixel_shape_errors(func):
    maps = np.zeros((2, 4, 4))
    with pytest.raises(ValueError, match="masks"):
        func(maps, np.zeros((2, 4, 5), dtype=bool))
    with pytest.raises(ValueError, match="maps"):
        func(np.zeros((4, 4)), np.zeros((4, 4), dtype=bool))


def test_image_shape_and_value_errors():
    with pytest.raises(ValueError, match="labels"):
        image_metrics([0.1, 0.2, 0.3], [0, 1])
    with pytest.raises(ValueError, match="scores"):
        image_metrics([[0.1, 0.2]], [[0, 1]])
    with pytest.raises(ValueError, match="scores"):
        image_metrics([0.1, np.nan, 0.3], [0, 1, 0])
    with pytest.raises(ValueError, match="labels"):
        image_metrics([0.1, 0.2, 0.3], [0, 2, 1])


def test_pixel_value_errors():
    masks = _blob_masks()
    maps = _blob_maps(masks, 0)
    bad = maps.copy()
    bad[0, 0, 0] = np.inf
    with pytest.raises(ValueError, match="maps"):
        pixel_metrics(bad, masks)
    with pytest.raises(ValueError, match="masks"):
        aupro(maps, masks * 255)
    for limit in (0.0, -0.1, 1.5, True):
        with pytest.raises(ValueError, match="fpr_limit"):
            aupro(maps, masks, fpr_limit=limit)
        with pytest.raises(ValueError, match="fpr_limit"):
            pro_musc(maps, masks, fpr_limit=limit)
    for steps in (0, -3, 2.5):
        with pytest.raises(ValueError, match="steps"):
            pro_musc(maps, masks, steps=steps)

"""Property tests for musc_tasks.core._metrics."""

import numpy as np
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from musc_tasks.core._metrics import aupro, image_metrics, pixel_metrics, pro_musc

from ..references import sklearn_metrics

SETTINGS = settings(max_examples=60, deadline=None)


@st.composite
def _maps_and_masks(draw):
    shape = (draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6)))
    # Few distinct integer levels force many ties between classes.
    maps = draw(arrays(np.int64, shape, elements=st.integers(0, 6))).astype(np.float64)
    masks = draw(arrays(bool, shape))
    assume(masks.any() and not masks.all())
    return maps, masks


@SETTINGS
@given(_maps_and_masks())
def test_pixel_metrics_match_sklearn(data):
    maps, masks = data
    got = pixel_metrics(maps, masks, pro=False)
    want = sklearn_metrics(maps.ravel(), masks.ravel())
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-9, key


@SETTINGS
@given(
    arrays(np.float64, st.integers(2, 40), elements=st.floats(-1e3, 1e3)),
    st.data(),
)
def test_image_metrics_match_sklearn(scores, data):
    labels = data.draw(arrays(bool, scores.shape))
    assume(labels.any() and not labels.all())
    got = image_metrics(scores, labels)
    want = sklearn_metrics(scores, labels)
    for key, value in want.items():
        assert abs(got[key] - value) < 1e-9, key


@SETTINGS
@given(_maps_and_masks(), st.sampled_from([0.05, 0.3, 1.0]))
def test_aupro_in_unit_interval_and_rank_invariant(data, fpr_limit):
    maps, masks = data
    value = aupro(maps, masks, fpr_limit=fpr_limit)
    assert 0.0 <= value <= 1.0 + 1e-12
    # Only the order of the scores matters.
    transformed = np.exp(maps) * 3.0 - 7.0
    assert abs(aupro(transformed, masks, fpr_limit=fpr_limit) - value) < 1e-12


@SETTINGS
@given(_maps_and_masks())
def test_pixel_metrics_agree_with_standalone_pro(data):
    maps, masks = data
    got = pixel_metrics(maps, masks)
    assert got["aupro"] == aupro(maps, masks)
    standalone = pro_musc(maps, masks)
    assert np.isnan(standalone) or 0.0 <= standalone <= 1.0 + 1e-12
    assert got["pro_musc"] == standalone or (np.isnan(got["pro_musc"]) and np.isnan(standalone))

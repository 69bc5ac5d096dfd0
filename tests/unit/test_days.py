"""The repeated-defect flag of tables/days on hand-made maps: one place across images, or scattered."""

import numpy as np
import pytest
import torch

from musc_tasks.days import MIN_REPEATED_IMAGES, SUSPECT_FRACTION, pool_evidence, product_signals

GRID = (2, 3)


def night(flagged_at: dict[int, int], n_images: int = 12):
    """Maps of a night where image i has one patch (flagged_at[i]) that the references flag and zero-shot does not."""
    zero_shot = torch.full((n_images, 6), 0.1)
    plus = torch.full((n_images, 6), 0.1)
    for image, patch in flagged_at.items():
        plus[image, patch] = 0.9
    references = torch.full((4, 6), 0.1)
    return pool_evidence(zero_shot, plus, references, references, 0.5, 0.5, GRID)


def test_one_place_across_images_fires_and_says_where():
    signals = product_signals([night({0: 4, 3: 4, 7: 4, 9: 1})])
    assert signals["systematic_defect_suspected"]
    assert signals["repeated_defect_images"] == 3
    assert signals["reference_only_fraction"] == pytest.approx(4 / 12)
    assert "3 of 12 images (25%)" in signals["reason"] and "row 2/2, column 2/3" in signals["reason"]


def test_scattered_flags_do_not_fire_however_many():
    signals = product_signals([night({0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 0, 7: 1})])
    assert signals["reference_only_fraction"] == pytest.approx(8 / 12)
    assert signals["repeated_defect_images"] == 2
    assert not signals["systematic_defect_suspected"]
    assert "at most 2 of 12" in signals["reason"] and "alert at 3" in signals["reason"]


def test_the_threshold_is_a_fraction_of_the_night_and_at_least_three():
    # 40 images: a fifth is 8; 7 at one place is not enough
    assert not product_signals([night(dict.fromkeys(range(7), 2), n_images=40)])["systematic_defect_suspected"]
    assert product_signals([night(dict.fromkeys(range(8), 2), n_images=40)])["systematic_defect_suspected"]
    # 5 images: a fifth is 1, but 2 at one place happen by chance
    assert MIN_REPEATED_IMAGES == 3 and SUSPECT_FRACTION == 0.2
    assert not product_signals([night({0: 1, 1: 1}, n_images=5)])["systematic_defect_suspected"]


def test_pools_of_one_product_add_up():
    first, second = night({0: 5, 1: 5}, n_images=6), night({2: 5, 3: 0}, n_images=6)
    assert not product_signals([first])["systematic_defect_suspected"]
    signals = product_signals([first, second])
    assert signals["repeated_defect_images"] == 3 and signals["systematic_defect_suspected"]
    np.testing.assert_array_equal(first.location_counts + second.location_counts, [1, 0, 0, 0, 0, 3])


def test_night_plus_auc_is_half_when_the_night_looks_like_the_references():
    assert product_signals([night({})])["night_plus_auc"] == 0.5
    drifted = pool_evidence(
        torch.zeros(3, 6), torch.full((3, 6), 0.7), torch.zeros(2, 6), torch.full((2, 6), 0.2), 0.5, 0.5, GRID
    )
    assert drifted.plus_auc == 1.0 and drifted.reference_only_images == 3

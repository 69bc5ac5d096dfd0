"""Maps, image scores, score averaging and pool splitting."""

import numpy as np
import pytest
import torch

from musc_tasks.core import average_scores, image_scores, split_by_type, split_pool, upsample_maps


def test_upsample_is_bilinear_align_corners():
    patch = torch.tensor([[0.0, 1.0, 2.0, 3.0]])  # 2x2 grid
    maps = upsample_maps(patch, (2, 2), (3, 3))
    expected = torch.tensor([[[0.0, 0.5, 1.0], [1.0, 1.5, 2.0], [2.0, 2.5, 3.0]]])
    torch.testing.assert_close(maps, expected)


def test_image_score_is_max_of_upsampled_map_not_of_grid():
    # (S-1)/(H-1) = 5/2 is not an integer: the grid's peak falls between pixels
    patch = torch.tensor([[0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    maps = upsample_maps(patch, (3, 3), (6, 6))
    assert image_scores(maps).item() < 1.0
    assert image_scores(maps).item() == pytest.approx(maps.max().item())


def test_average_over_layers_then_degrees_in_float64():
    scores = torch.rand(3, 4, 2, 5)
    torch.testing.assert_close(average_scores(scores), scores.double().mean(dim=(0, 1)).float())


@pytest.mark.parametrize("n, size", [(0, 5), (5, 5), (6, 5), (201, 200), (1000, 200), (17, 4)])
def test_split_pool_is_a_balanced_partition(n, size):
    pools = split_pool(n, size, seed=3)
    flat = sorted(i for pool in pools for i in pool)
    assert flat == list(range(n))
    assert all(len(p) <= size for p in pools)
    if n:
        assert max(map(len, pools)) - min(map(len, pools)) <= 1
    assert pools == split_pool(n, size, seed=3)


def test_split_by_type_follows_the_paper_rule():
    types = ["crack"] * 5 + ["good"] * 4
    subsets = split_by_type(types, 2, seed=42)
    import random

    rng = random.Random(42)
    crack, good = list(range(5)), list(range(5, 9))
    rng.shuffle(crack)
    rng.shuffle(good)
    assert subsets == [crack[0::2] + good[0::2], crack[1::2] + good[1::2]]
    assert sorted(np.concatenate(subsets).tolist()) == list(range(9))

"""MSM against torch.cdist, written the plain way."""

import pytest
import torch

from musc_tasks.core import (
    mutual_scores,
    nearest_similarities,
    neighbour_count,
    scores_from_similarities,
)


def unit_tokens(n, length, c, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, length, c, generator=generator), dim=-1)


def msm_by_cdist(tokens, interval=0.3):
    """Per image: distances to every other image's patches, min per image, mean of K smallest."""
    n = len(tokens)
    k = max(1, int(interval * (n - 1)))
    scores = []
    for i in range(n):
        per_image = torch.stack(
            [torch.cdist(tokens[i].double(), tokens[j].double()).min(dim=1).values for j in range(n) if j != i],
            dim=1,
        )  # (L, N-1)
        scores.append(per_image.sort(dim=1).values[:, :k].mean(dim=1))
    return torch.stack(scores).float()


@pytest.mark.parametrize("n", [2, 3, 4, 5, 7, 12])
def test_matches_cdist_reference(n):
    tokens = unit_tokens(n, 9, 16, seed=n)
    torch.testing.assert_close(mutual_scores(tokens), msm_by_cdist(tokens), atol=1e-5, rtol=0)


@pytest.mark.parametrize("block", [1, 2, 3, 5, 100])
def test_block_size_does_not_change_scores(block):
    tokens = unit_tokens(7, 6, 8, seed=1)
    torch.testing.assert_close(mutual_scores(tokens, tile=block), msm_by_cdist(tokens), atol=1e-5, rtol=0)


def test_both_directions_come_from_one_product():
    a, b = unit_tokens(3, 5, 8, seed=2), unit_tokens(2, 5, 8, seed=3)
    a_to_b, b_to_a = nearest_similarities(a, b)
    for i in range(3):
        for j in range(2):
            dots = a[i] @ b[j].T  # (L, L)
            torch.testing.assert_close(a_to_b[i, :, j], dots.max(dim=1).values)
            torch.testing.assert_close(b_to_a[j, :, i], dots.max(dim=0).values)


def plain_similarities(a, b):
    """(Ba, L, Bb) and (Bb, L, Ba) maxima of every pair of images, one pair at a time."""
    a_to_b = torch.stack([torch.stack([(x @ y.T).max(dim=1).values for y in b], dim=1) for x in a])
    b_to_a = torch.stack([torch.stack([(x @ y.T).max(dim=0).values for x in a], dim=1) for y in b])
    return a_to_b, b_to_a


@pytest.mark.parametrize("tile", [1, 2, 3, 4, 100])
def test_tiles_give_the_plain_result(tile):
    a, b = unit_tokens(7, 5, 8, seed=6), unit_tokens(4, 5, 8, seed=7)
    for got, expected in zip(nearest_similarities(a, b, tile=tile), plain_similarities(a, b)):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("tile", [1, 2, 3, 7])
def test_a_block_against_itself_fills_both_triangles(tile):
    a = unit_tokens(7, 5, 8, seed=8)
    a_to_b, b_to_a = nearest_similarities(a, a, tile=tile)
    expected, _ = plain_similarities(a, a)
    torch.testing.assert_close(a_to_b, expected)
    torch.testing.assert_close(b_to_a, expected)


def test_tile_must_be_positive():
    with pytest.raises(ValueError, match="tile"):
        nearest_similarities(unit_tokens(3, 4, 4), unit_tokens(3, 4, 4), tile=0)


@pytest.mark.parametrize("n, k", [(2, 1), (3, 1), (4, 1), (5, 1), (6, 1), (11, 3), (21, 6), (200, 59)])
def test_neighbour_count(n, k):
    assert neighbour_count(n) == k


def test_single_image_pool_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 2 images"):
        mutual_scores(unit_tokens(1, 4, 4))


def test_identical_images_score_zero_and_an_outlier_scores_high():
    base = unit_tokens(1, 8, 16, seed=4)
    tokens = base.repeat(6, 1, 1)
    tokens[5, 3] = unit_tokens(1, 1, 16, seed=5)[0, 0]
    scores = mutual_scores(tokens)
    assert scores[:5].max() < 1e-3
    assert scores[5, 3] > 0.5
    assert scores[5].argmax() == 3


def test_scores_from_similarities_ignores_own_column():
    similarities = torch.tensor([[[1.0, 0.5, 0.0]]])  # one patch vs images 0, 1, 2
    scores = scores_from_similarities(similarities, torch.tensor([0]), 1)
    torch.testing.assert_close(scores, torch.tensor([[1.0]]))  # sqrt(2 - 2*0.5)

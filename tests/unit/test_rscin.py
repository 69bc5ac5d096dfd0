"""RsCIN against a plain double loop."""

import numpy as np
import pytest

from musc_tasks.core import rescore_images


def rscin_by_loops(scores, embeddings, k_list):
    n = len(scores)
    c = (scores - scores.min()) / (scores.max() - scores.min())
    w = embeddings @ embeddings.T
    out = np.zeros(n)
    for k in k_list:
        for i in range(n):
            # self first among ties, then lower index
            order = sorted(range(n), key=lambda j: (-w[i, j], j != i, j))[:k]
            weights = np.array([w[i, j] for j in order])
            out[i] += (weights / weights.sum() * c[order]).sum()
    return out / len(k_list)


def unit_rows(n, d, seed):
    rows = np.random.default_rng(seed).normal(size=(n, d)) + 3  # mostly positive similarities
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


@pytest.mark.parametrize("k_list", [[1], [1, 2, 3], [1, 8, 9], [2, 20]])
def test_matches_loops(k_list):
    rng = np.random.default_rng(0)
    scores, embeddings = rng.random(10), unit_rows(10, 5, 1)
    np.testing.assert_allclose(rescore_images(scores, embeddings, k_list), rscin_by_loops(scores, embeddings, k_list))


def test_k1_is_the_normalised_score():
    rng = np.random.default_rng(1)
    scores = rng.random(6) * 4 + 2
    out = rescore_images(scores, unit_rows(6, 3, 2), [1])
    np.testing.assert_allclose(out, (scores - scores.min()) / (scores.max() - scores.min()))


def test_ties_prefer_the_image_itself_then_lower_index():
    # images 0 and 2 share an embedding; with k=1 each must keep itself
    embeddings = unit_rows(4, 3, 3)
    embeddings[2] = embeddings[0]
    scores = np.array([0.0, 0.5, 1.0, 0.25])
    np.testing.assert_allclose(rescore_images(scores, embeddings, [1]), scores)
    expected = rscin_by_loops(scores, embeddings, [2, 3])
    np.testing.assert_allclose(rescore_images(scores, embeddings, [2, 3]), expected)


def test_constant_scores_and_bad_input():
    assert np.all(rescore_images(np.ones(3), unit_rows(3, 2, 4), [1, 2]) == 0)
    with pytest.raises(ValueError, match="k_list"):
        rescore_images(np.ones(3), unit_rows(3, 2, 4), [0])
    with pytest.raises(ValueError, match="embeddings"):
        rescore_images(np.ones(3), unit_rows(4, 2, 4), [1])

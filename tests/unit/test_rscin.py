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


def margins_by_hand(scores, threshold):
    """Median, MAD and mean absolute deviation by sorting, one image at a time."""
    ordered = sorted(scores)
    n = len(ordered)

    def median(values):
        values = sorted(values)
        return values[n // 2] if n % 2 else (values[n // 2 - 1] + values[n // 2]) / 2

    centre = median(ordered)
    deviations = [abs(s - centre) for s in scores]
    sigma = 1.4826 * median(deviations) or 1.2533 * sum(deviations) / n
    return [float("nan") if sigma == 0 else (s - threshold) / sigma for s in scores]


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("n", [1, 2, 7, 30])
def test_margins_match_a_hand_computation_and_their_sign_is_the_flag(seed, n):
    from musc_tasks.rscin import robust_threshold, threshold_margins

    rng = np.random.default_rng(seed)
    scores = rng.gamma(2.0, 0.1, size=n)
    for threshold in (robust_threshold(scores), 0.25):
        margins = threshold_margins(scores, threshold)
        np.testing.assert_allclose(margins, margins_by_hand(list(scores), threshold), rtol=1e-12)
        if n > 1:
            np.testing.assert_array_equal(margins > 0, scores > threshold)


def test_margins_when_the_mad_is_zero_and_when_all_scores_are_equal():
    from musc_tasks.rscin import robust_threshold, threshold_margins

    # 4 of 5 scores equal: MAD 0, so the spread is 1.2533 x the mean absolute deviation (0.2).
    scores = np.array([0.5, 0.5, 0.5, 0.5, 1.5])
    threshold = robust_threshold(scores)
    assert threshold == 0.5
    np.testing.assert_allclose(threshold_margins(scores, threshold), [0, 0, 0, 0, 1.0 / (1.2533 * 0.2)])
    # No spread at all: no scale to express a margin in.
    assert np.isnan(threshold_margins(np.full(4, 0.3), 0.2)).all()
    with pytest.raises(ValueError, match="threshold"):
        threshold_margins(scores, float("nan"))
    with pytest.raises(ValueError, match="scores"):
        threshold_margins(np.array([]), 0.1)

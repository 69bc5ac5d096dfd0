"""Few-shot MuSc, MuSc+ and the combined rule against brute force (torch.cdist, nested loops)."""

import pytest
import torch

from musc_tasks.core import (
    aggregate_tokens,
    check_references,
    combined_scores,
    exceedance_auc,
    few_shot_neighbour_count,
    few_shot_scores_from_similarities,
    mutual_scores,
    nearest_reference_distances,
    nearest_similarities,
    reference_only_patches,
    reference_pool_patch_scores,
    reference_scale,
    reference_score_maps,
)


def unit_tokens(n, length, c, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, length, c, generator=generator), dim=-1)


def few_shot_by_cdist(night, references, interval=0.3):
    """Per night image: nearest-patch distance to every other night image and every reference, K smallest."""
    n, m = len(night), len(references)
    k = max(1, int(interval * (n - 1 + m)))
    scorers = [night[j] for j in range(n)] + [references[j] for j in range(m)]
    scores = []
    for i in range(n):
        per_image = torch.stack(
            [torch.cdist(night[i].double(), s.double()).min(dim=1).values for j, s in enumerate(scorers) if j != i],
            dim=1,
        )
        scores.append(per_image.sort(dim=1).values[:, :k].mean(dim=1))
    return torch.stack(scores).float()


def plus_by_loops(night, references):
    """Per patch: the smallest distance to any patch of any reference, one loop per reference."""
    best = torch.full(night.shape[:2], torch.inf, dtype=torch.float64)
    for reference in references:
        for i in range(len(night)):
            best[i] = torch.minimum(best[i], torch.cdist(night[i].double(), reference.double()).min(dim=1).values)
    return best.float()


def similarities(night, references):
    return nearest_similarities(night, references)[0]


@pytest.mark.parametrize(("n", "m"), [(1, 1), (2, 1), (3, 4), (6, 2), (9, 5)])
def test_few_shot_matches_cdist(n, m):
    night, references = unit_tokens(n, 9, 16, seed=n), unit_tokens(m, 9, 16, seed=100 + m)
    k = few_shot_neighbour_count(n, m)
    pool = nearest_similarities(night, night)[0]
    got = few_shot_scores_from_similarities(pool, similarities(night, references), torch.arange(n), k)
    torch.testing.assert_close(got, few_shot_by_cdist(night, references), atol=1e-5, rtol=0)


@pytest.mark.parametrize(("n", "m"), [(2, 3), (8, 4)])
def test_few_shot_is_mutual_scoring_of_the_union_restricted_to_the_night(n, m):
    """References are scorers, never scored: few-shot rows equal MSM rows of night + references."""
    night, references = unit_tokens(n, 9, 16, seed=3), unit_tokens(m, 9, 16, seed=4)
    lnamd = aggregate_tokens(torch.cat([night, references]), (3, 3), 1)  # LNAMD is per image
    union = mutual_scores(lnamd)[:n]
    got = reference_pool_patch_scores([night], [references], (3, 3), (1,), mode="few-shot")
    assert got.shape == (n, 9)
    torch.testing.assert_close(got, union, atol=1e-5, rtol=0)


@pytest.mark.parametrize(("n", "m"), [(1, 1), (4, 3), (7, 6)])
def test_plus_matches_loops(n, m):
    night, references = unit_tokens(n, 9, 16, seed=n), unit_tokens(m, 9, 16, seed=50 + m)
    got = nearest_reference_distances(similarities(night, references))
    torch.testing.assert_close(got, plus_by_loops(night, references), atol=1e-5, rtol=0)


def test_pool_scores_average_layers_and_degrees_like_msm():
    grid, r_list = (4, 4), (1, 3)
    night = [torch.randn(5, 16, 8, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    references = [torch.randn(3, 16, 8, generator=torch.Generator().manual_seed(s)) for s in (3, 4)]
    for mode, brute in (("few-shot", few_shot_by_cdist), ("plus", plus_by_loops)):
        expected = (
            torch.stack(
                [
                    torch.stack(
                        [
                            brute(aggregate_tokens(t, grid, r), aggregate_tokens(q, grid, r))
                            for t, q in zip(night, references)
                        ]
                    )
                    for r in r_list
                ]
            )
            .double()
            .mean(dim=(0, 1))
            .float()
        )
        got = reference_pool_patch_scores(night, references, grid, r_list, mode=mode)
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_reference_identical_to_a_night_image_scores_it_zero():
    night, references = unit_tokens(4, 9, 16, seed=7), unit_tokens(2, 9, 16, seed=8)
    references[1] = night[2]
    plus = nearest_reference_distances(similarities(night, references))
    assert torch.all(plus[2] < 1e-3)
    assert torch.all(plus[[0, 1, 3]] > 0.1)
    # with K = 1 the identical reference is the nearest scorer, so few-shot gives 0 too
    few = reference_pool_patch_scores([night], [references], (3, 3), (1,), mode="few-shot", interval=0.2)
    assert few_shot_neighbour_count(4, 2, 0.2) == 1
    assert torch.all(few[2] < 1e-3)


@pytest.mark.parametrize(
    ("n", "m", "interval", "k"), [(1, 1, 0.3, 1), (5, 5, 0.3, 2), (10, 4, 0.5, 6), (3, 2, 1.0, 4), (40, 20, 0.3, 17)]
)
def test_neighbour_count_counts_references_among_scorers(n, m, interval, k):
    assert few_shot_neighbour_count(n, m, interval) == k


def test_interval_one_averages_every_scorer():
    night, references = unit_tokens(3, 9, 16, seed=9), unit_tokens(2, 9, 16, seed=10)
    got = reference_pool_patch_scores([night], [references], (3, 3), (1,), mode="few-shot", interval=1.0)
    expected = few_shot_by_cdist(aggregate_tokens(night, (3, 3), 1), aggregate_tokens(references, (3, 3), 1), 1.0)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_combined_is_the_larger_score_in_zero_shot_units():
    night, references = unit_tokens(6, 9, 16, seed=11), unit_tokens(4, 9, 16, seed=12)
    raw_night, raw_references = night, references
    night, references = aggregate_tokens(night, (3, 3), 1), aggregate_tokens(references, (3, 3), 1)
    zero_shot = mutual_scores(night)
    plus = plus_by_loops(night, references)
    # a reference scored by the night as one more night image; MuSc+ of a reference against the others
    ref_zero = torch.stack([mutual_scores(torch.cat([night, references[m : m + 1]]))[-1] for m in range(4)])
    ref_plus = torch.stack(
        [plus_by_loops(references[m : m + 1], torch.cat([references[:m], references[m + 1 :]]))[0] for m in range(4)]
    )
    zs_scale = float(torch.quantile(ref_zero.double().flatten(), 0.99))
    plus_scale = float(torch.quantile(ref_plus.double().flatten(), 0.99))
    expected = torch.maximum(zero_shot, plus * zs_scale / plus_scale)
    got = reference_pool_patch_scores([raw_night], [raw_references], (3, 3), (1,), mode="combined")
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert torch.all(got >= zero_shot - 1e-6)


def test_combined_scores_and_scale_validate():
    with pytest.raises(ValueError, match="shape"):
        combined_scores(torch.zeros(2, 3), torch.zeros(3, 2), 1.0, 1.0)
    with pytest.raises(ValueError, match="positive"):
        combined_scores(torch.zeros(2, 3), torch.zeros(2, 3), 0.0, 1.0)
    with pytest.raises(ValueError, match="empty"):
        reference_scale(torch.zeros(0, 4))
    assert reference_scale(torch.zeros(3, 4)) == 1e-6


@pytest.mark.parametrize("mode", ["few-shot", "plus", "combined"])
def test_empty_reference_set_is_a_clear_error(mode):
    night = unit_tokens(3, 9, 16)
    with pytest.raises(ValueError, match="reference set is empty"):
        reference_pool_patch_scores([night], [night[:0]], (3, 3), (1,), mode=mode)


def test_single_reference_works_for_few_shot_and_plus_not_combined():
    night, reference = unit_tokens(3, 9, 16), unit_tokens(1, 9, 16, seed=5)
    for mode in ("few-shot", "plus"):
        assert reference_pool_patch_scores([night], [reference], (3, 3), (1,), mode=mode).shape == (3, 9)
    with pytest.raises(ValueError, match="single image.*at least 2 references"):
        reference_pool_patch_scores([night], [reference], (3, 3), (1,), mode="combined")


def test_unknown_mode_and_layer_mismatch_are_clear_errors():
    night = unit_tokens(3, 9, 16)
    with pytest.raises(ValueError, match="reference mode must be one of"):
        check_references(2, "zero-shot")
    with pytest.raises(ValueError, match="same non-zero number of layers"):
        reference_pool_patch_scores([night, night], [night], (3, 3), (1,), mode="plus")


def test_exceedance_auc_counts_pairs_with_ties_as_half():
    generator = torch.Generator().manual_seed(3)
    night = torch.randint(0, 6, (7, 5), generator=generator).float()  # many ties
    references = torch.randint(0, 6, (4, 5), generator=generator).float()
    pairs = [(x > y) + 0.5 * (x == y) for x in night.flatten().tolist() for y in references.flatten().tolist()]
    assert exceedance_auc(night, references) == pytest.approx(sum(pairs) / len(pairs), abs=1e-12)
    assert exceedance_auc(torch.ones(3), torch.ones(2)) == 0.5
    assert exceedance_auc(torch.full((2,), 2.0), torch.ones(3)) == 1.0
    with pytest.raises(ValueError, match="at least one"):
        exceedance_auc(torch.zeros(0), torch.ones(2))


def test_reference_only_patches_are_far_from_the_references_and_quiet_tonight():
    zero_shot = torch.tensor([[0.1, 0.9, 0.1], [0.5, 0.5, 0.5]])
    plus = torch.tensor([[0.8, 0.8, 0.2], [0.6, 0.7, 0.3]])
    flagged = reference_only_patches(zero_shot, plus, zero_shot_scale=0.5, plus_scale=0.5)
    # patch (0, 1) is flagged by zero-shot too; row 1 sits exactly on the zero-shot scale: not quiet
    assert flagged.tolist() == [[True, False, False], [False, False, False]]
    with pytest.raises(ValueError, match="shape"):
        reference_only_patches(zero_shot, plus.T, 0.5, 0.5)


def test_score_maps_hold_what_each_mode_returns():
    night, references = unit_tokens(5, 9, 16, seed=21), unit_tokens(3, 9, 16, seed=22)
    maps = reference_score_maps([night], [references], (3, 3), (1, 3))
    assert {k: tuple(v.shape) for k, v in maps.items()} == {
        "zero_shot": (5, 9),
        "few_shot": (5, 9),
        "plus": (5, 9),
        "reference_zero_shot": (3, 9),
        "reference_plus": (3, 9),
    }
    for mode in ("few-shot", "plus"):
        got = reference_pool_patch_scores([night], [references], (3, 3), (1, 3), mode=mode)
        torch.testing.assert_close(got, maps[mode.replace("-", "_")], atol=1e-6, rtol=0)
    with pytest.raises(ValueError, match="2 night images"):
        reference_score_maps([night[:1]], [references], (3, 3))

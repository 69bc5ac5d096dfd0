"""Scoring against known-good reference images: the paper's few-shot MuSc and MuSc+ (A.6).

References are M images a person (or the curation rule) vouches for as normal. They are
scorers, never scored: the night's N images get patch scores, the references get none.

- few-shot (A.6.1): the references join mutual scoring as extra images of the pool. A patch
  of image i is compared with the N - 1 other night images and the M references, and its score
  is the mean of the ``K = max(1, int(interval * (N - 1 + M)))`` smallest of those N - 1 + M
  nearest-patch distances (the interval is a fraction of everything that scores the image).
- plus (A.6.2, MuSc+): a patch is scored only against the references, per layer and r the
  minimum distance to any reference patch (Eq. 9-10); averaged over layers and r as MSM (Eq. 11).
- combined: ``max(zero_shot, plus * scale_zero_shot / scale_plus)`` where each scale is a
  high quantile of that score's patch scores on the references themselves: zero-shot scores
  of each reference against the night (how a known-normal image scores tonight), plus scores
  of each reference against the other references (leave-one-out). Both terms are then in
  zero-shot units, one unit being "as anomalous as the most anomalous normal patch", so an
  ordinary night keeps MuSc's zero-shot scores wherever they matter, and a defect that repeats
  across the night (which mutual scoring calls normal) still stands out through MuSc+.

Evidence of a repeated defect (`reference_only_patches`): a patch whose MuSc+ score is above
the references' own scale while its zero-shot score stays below theirs is one the references
flag and the night vouches for; `exceedance_auc` compares a night's scores with the
references' own as a rank statistic.

The similarities come from the same GEMM as the pool's (`nearest_similarities`): one product
of a night block with a reference block gives both the night-to-reference similarities (for
few-shot and plus) and the reference-to-night ones (for the zero-shot scale).
"""

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ._lnamd import aggregate_tokens
from ._maps import average_scores
from ._msm import mutual_scores, nearest_similarities, neighbour_count, scores_from_similarities

__all__ = [
    "REFERENCE_MODES",
    "check_references",
    "combined_scores",
    "exceedance_auc",
    "few_shot_neighbour_count",
    "few_shot_scores_from_similarities",
    "leave_one_out_distances",
    "nearest_reference_distances",
    "reference_only_patches",
    "reference_pool_patch_scores",
    "reference_scale",
    "reference_score_maps",
]

REFERENCE_MODES = ("few-shot", "plus", "combined")


def check_references(n_references: int, mode: str) -> None:
    """Refuse reference sets that a mode cannot use, with the reason.

    Parameters
    ----------
    n_references : int
        Size M of the reference set.
    mode : str
        One of `REFERENCE_MODES`.
    """
    if mode not in REFERENCE_MODES:
        raise ValueError(f"reference mode must be one of {', '.join(REFERENCE_MODES)}, got {mode!r}")
    if n_references < 1:
        raise ValueError(f"the reference set is empty: reference mode {mode!r} needs at least one known-good image")
    if mode == "combined" and n_references < 2:
        raise ValueError(
            "the reference set holds a single image: 'combined' scales MuSc+ by the references' "
            "leave-one-out scores, which need at least 2 references (use --reference-mode few-shot "
            "or plus with one image, or add references)"
        )


def few_shot_neighbour_count(n_images: int, n_references: int, interval: float = 0.3) -> int:
    """K of few-shot MuSc: the interval of the N - 1 night images plus the M references.

    Parameters
    ----------
    n_images : int
        Night pool size N, at least 1 (a single night image is scored by the references alone).
    n_references : int
        Reference set size M, at least 1.
    interval : float
        Fraction in (0, 1].

    Returns
    -------
    k : int
        ``max(1, int(interval * (N - 1 + M)))``.
    """
    if n_images < 1:
        raise ValueError(f"n_images must be >= 1, got {n_images}")
    check_references(n_references, "few-shot")
    return neighbour_count(n_images + n_references, interval)


def few_shot_scores_from_similarities(
    pool_similarities: Tensor, reference_similarities: Tensor, own_index: Tensor, k: int
) -> Tensor:
    """Few-shot patch scores: the pool's other images and the references as scorers.

    Parameters
    ----------
    pool_similarities : (B, L, N) float tensor
        Best-match similarity of each patch with every night image (own column ignored).
    reference_similarities : (B, L, M) float tensor
        Best-match similarity of each patch with every reference image.
    own_index : (B,) int64 tensor
        Column of each row's own image among the N night images.
    k : int
        `few_shot_neighbour_count`.

    Returns
    -------
    scores : (B, L) float32 tensor
    """
    if reference_similarities.shape[:2] != pool_similarities.shape[:2]:
        raise ValueError(
            f"pool and reference similarities disagree on (B, L): {tuple(pool_similarities.shape)} "
            f"and {tuple(reference_similarities.shape)}"
        )
    check_references(reference_similarities.shape[2], "few-shot")
    joined = torch.cat([pool_similarities.float(), reference_similarities.float()], dim=2)
    return scores_from_similarities(joined, own_index, k)


def nearest_reference_distances(reference_similarities: Tensor) -> Tensor:
    """MuSc+ patch scores (Eq. 9-10): distance to the nearest patch of any reference.

    Parameters
    ----------
    reference_similarities : (B, L, M) float tensor
        Best-match similarity of each patch with every reference image.

    Returns
    -------
    scores : (B, L) float32 tensor
        ``min_m sqrt(2 - 2 s[b, p, m])``.
    """
    check_references(reference_similarities.shape[2], "plus")
    best = reference_similarities.float().amax(dim=2)
    return torch.sqrt(torch.clamp(2.0 - 2.0 * best, min=0.0))


def reference_scale(reference_scores: Tensor, quantile: float = 0.99) -> float:
    """How high a score gets on known-normal patches: a quantile of the references' scores.

    Parameters
    ----------
    reference_scores : (M, L) float tensor
        Patch scores of the references themselves (zero-shot against the night, or MuSc+
        leave-one-out against the other references).
    quantile : float
        In (0, 1]. 0.99 ignores the odd outlying patch of a reference without letting a
        typical normal patch define the unit.

    Returns
    -------
    scale : float
        Positive (a floor of 1e-6 keeps a degenerate set of identical references finite).
    """
    if reference_scores.numel() == 0:
        raise ValueError("no reference scores to take a scale from: the reference set is empty")
    if not 0.0 < quantile <= 1.0:
        raise ValueError(f"quantile must be in (0, 1], got {quantile}")
    return max(float(torch.quantile(reference_scores.double().flatten(), quantile)), 1e-6)


def combined_scores(zero_shot: Tensor, plus: Tensor, zero_shot_scale: float, plus_scale: float) -> Tensor:
    """The combined rule: the larger of zero-shot and MuSc+, both in zero-shot units.

    Parameters
    ----------
    zero_shot, plus : (N, L) float tensors
        Patch scores of the same images (averaged over layers and r).
    zero_shot_scale, plus_scale : float
        `reference_scale` of each score on the references.

    Returns
    -------
    scores : (N, L) float32 tensor
        ``max(zero_shot, plus * zero_shot_scale / plus_scale)``.
    """
    if zero_shot.shape != plus.shape:
        raise ValueError(f"zero-shot and plus scores differ in shape: {tuple(zero_shot.shape)} and {tuple(plus.shape)}")
    if zero_shot_scale <= 0 or plus_scale <= 0:
        raise ValueError(f"scales must be positive, got {zero_shot_scale} and {plus_scale}")
    return torch.maximum(zero_shot.float(), plus.float() * (zero_shot_scale / plus_scale))


def reference_score_maps(
    layer_tokens: Sequence[Tensor],
    reference_tokens: Sequence[Tensor],
    grid: tuple[int, int],
    r_list: Sequence[int] = (1, 3, 5),
    *,
    interval: float = 0.3,
) -> dict[str, Tensor]:
    """Every score of one night pool with a reference set, in memory (the plain path).

    Parameters
    ----------
    layer_tokens : sequence of Y (N, L, C) float tensors
        Raw patch tokens of the night's images, one tensor per feature layer (N >= 2).
    reference_tokens : sequence of Y (M, L, C) float tensors
        Raw patch tokens of the references, same layers (M >= 2).
    grid : (H, W)
        Patch grid, H * W = L.
    r_list : sequence of int
        LNAMD aggregation degrees.
    interval : float
        As in `mutual_scores`; few-shot counts the references among the scorers.

    Returns
    -------
    maps : dict of str to tensor
        Averaged over layers and aggregation degrees: ``zero_shot``, ``few_shot`` and ``plus``
        (N, L) of the night; ``reference_zero_shot`` (M, L), each reference scored against the
        night as one more night image, and ``reference_plus`` (M, L), each reference's MuSc+
        against the other references (leave-one-out).
    """
    _check_maps(layer_tokens, reference_tokens, r_list)
    n_images = layer_tokens[0].shape[0]
    n_references = reference_tokens[0].shape[0]
    check_references(n_references, "combined")
    if n_images < 2:
        raise ValueError("scoring a night with references needs at least 2 night images (it includes zero-shot)")
    own_index = torch.arange(n_images)
    few_shot_k = few_shot_neighbour_count(n_images, n_references, interval)
    zero_shot_k = neighbour_count(n_images + 1, interval)  # a reference scored as one more night image
    names = ("zero_shot", "few_shot", "plus", "reference_zero_shot", "reference_plus")
    per_map: dict[str, list[Tensor]] = {name: [] for name in names}
    for night, known in _aggregated_maps(layer_tokens, reference_tokens, grid, r_list):
        to_references, to_night = nearest_similarities(night, known)  # (N, L, M), (M, L, N)
        night_to_night, _ = nearest_similarities(night, night)
        among, _ = nearest_similarities(known, known)
        per_map["zero_shot"].append(mutual_scores(night, interval=interval))
        per_map["few_shot"].append(
            few_shot_scores_from_similarities(night_to_night, to_references, own_index, few_shot_k)
        )
        per_map["plus"].append(nearest_reference_distances(to_references))
        per_map["reference_zero_shot"].append(
            scores_from_similarities(
                torch.cat([to_night, torch.full_like(to_night[:, :, :1], -1.0)], dim=2),
                torch.full((n_references,), n_images),
                zero_shot_k,
            )
        )
        per_map["reference_plus"].append(leave_one_out_distances(among))
    return {name: _average_maps(scores, r_list, layer_tokens) for name, scores in per_map.items()}


def reference_pool_patch_scores(
    layer_tokens: Sequence[Tensor],
    reference_tokens: Sequence[Tensor],
    grid: tuple[int, int],
    r_list: Sequence[int] = (1, 3, 5),
    *,
    mode: str = "combined",
    interval: float = 0.3,
    quantile: float = 0.99,
) -> Tensor:
    """Patch scores of one night pool with a reference set, in memory (the plain path).

    Parameters
    ----------
    layer_tokens : sequence of Y (N, L, C) float tensors
        Raw patch tokens of the night's images, one tensor per feature layer.
    reference_tokens : sequence of Y (M, L, C) float tensors
        Raw patch tokens of the references, same layers.
    grid : (H, W)
        Patch grid, H * W = L.
    r_list : sequence of int
        LNAMD aggregation degrees.
    mode : {"few-shot", "plus", "combined"}
    interval : float
        As in `mutual_scores`; few-shot counts the references among the scorers.
    quantile : float
        `reference_scale` quantile (combined only).

    Returns
    -------
    patch_scores : (N, L) float32 tensor
        Averaged over layers and aggregation degrees. References get no scores.
    """
    _check_maps(layer_tokens, reference_tokens, r_list)
    n_images = layer_tokens[0].shape[0]
    check_references(reference_tokens[0].shape[0], mode)
    if mode == "combined":
        maps = reference_score_maps(layer_tokens, reference_tokens, grid, r_list, interval=interval)
        return combined_scores(
            maps["zero_shot"],
            maps["plus"],
            reference_scale(maps["reference_zero_shot"], quantile),
            reference_scale(maps["reference_plus"], quantile),
        )
    k = few_shot_neighbour_count(n_images, reference_tokens[0].shape[0], interval) if mode == "few-shot" else 0
    per_map = []
    for night, known in _aggregated_maps(layer_tokens, reference_tokens, grid, r_list):
        to_references, _ = nearest_similarities(night, known)
        if mode == "few-shot":
            night_to_night, _ = nearest_similarities(night, night)
            per_map.append(few_shot_scores_from_similarities(night_to_night, to_references, torch.arange(n_images), k))
        else:
            per_map.append(nearest_reference_distances(to_references))
    return _average_maps(per_map, r_list, layer_tokens)


def _check_maps(layer_tokens: Sequence[Tensor], reference_tokens: Sequence[Tensor], r_list: Sequence[int]) -> None:
    if len(layer_tokens) != len(reference_tokens) or not layer_tokens:
        raise ValueError(
            f"night and reference tokens need the same non-zero number of layers, got "
            f"{len(layer_tokens)} and {len(reference_tokens)}"
        )
    if not r_list:
        raise ValueError("r_list is empty: at least one aggregation degree is needed")


def _aggregated_maps(
    layer_tokens: Sequence[Tensor], reference_tokens: Sequence[Tensor], grid: tuple[int, int], r_list: Sequence[int]
) -> Iterator[tuple[Tensor, Tensor]]:
    """LNAMD tokens of the night and of the references for each (r, layer), r major, one map at a time."""
    for r in r_list:
        for tokens, references in zip(layer_tokens, reference_tokens, strict=True):
            yield aggregate_tokens(tokens, grid, r), aggregate_tokens(references, grid, r)


def _average_maps(per_map: list[Tensor], r_list: Sequence[int], layer_tokens: Sequence[Tensor]) -> Tensor:
    """`average_scores` of R * Y (N, L) maps listed r major."""
    return average_scores(torch.stack(per_map).unflatten(0, (len(r_list), len(layer_tokens))))


def leave_one_out_distances(among: Tensor) -> Tensor:
    """MuSc+ scores of each reference against the other references.

    Parameters
    ----------
    among : (M, L, M) float tensor
        Best-match similarity of each reference patch with every reference image.

    Returns
    -------
    scores : (M, L) float32 tensor
        Distance to the nearest patch of any *other* reference (its own column ignored).
    """
    masked = among.float().clone()
    rows = torch.arange(masked.shape[0])
    masked[rows, :, rows] = -1.0  # a reference never matches itself
    return torch.sqrt(torch.clamp(2.0 - 2.0 * masked.amax(dim=2), min=0.0))


def reference_only_patches(zero_shot: Tensor, plus: Tensor, zero_shot_scale: float, plus_scale: float) -> Tensor:
    """Patches the references flag and zero-shot does not: what a defect repeated across a night looks like.

    Parameters
    ----------
    zero_shot, plus : (N, L) float tensors
        Patch scores of the same images.
    zero_shot_scale, plus_scale : float
        `reference_scale` of each score on the references (the combined rule's units).

    Returns
    -------
    flagged : (N, L) bool tensor
        ``plus > plus_scale`` (farther from every reference than almost any reference patch is
        from the other references) and ``zero_shot < zero_shot_scale`` (the night finds it as
        normal as a known-good image).
    """
    if zero_shot.shape != plus.shape:
        raise ValueError(f"zero-shot and plus scores differ in shape: {tuple(zero_shot.shape)} and {tuple(plus.shape)}")
    return (plus > plus_scale) & (zero_shot < zero_shot_scale)


def exceedance_auc(scores: Tensor, reference_scores: Tensor) -> float:
    """How often a score exceeds a reference score: the Mann-Whitney U over all pairs.

    Parameters
    ----------
    scores : float tensor, any shape
        E.g. a night's MuSc+ patch scores.
    reference_scores : float tensor, any shape
        E.g. the references' leave-one-out MuSc+ patch scores.

    Returns
    -------
    auc : float
        ``P(x > y) + P(x = y) / 2`` for x from ``scores`` and y from ``reference_scores``: 0.5 when
        both come from one distribution, towards 1 when the scores drift above the references'.
    """
    if scores.numel() == 0 or reference_scores.numel() == 0:
        raise ValueError("exceedance_auc needs at least one score on each side")
    known = reference_scores.double().flatten().sort().values
    values = scores.double().flatten()
    below = torch.searchsorted(known, values, side="left")
    not_above = torch.searchsorted(known, values, side="right")
    return float((below + not_above).double().sum() / (2.0 * values.numel() * known.numel()))

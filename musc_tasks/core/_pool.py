"""Per-pool computation: layer tokens -> LNAMD -> MSM -> patch scores averaged over (r, layer).

Three functions hold the arithmetic of a block of a pool's images, one (r, layer) map after
another, r major: `block_aggregates` (a block's LNAMD tokens for every map),
`block_pair_similarities` (the nearest-patch similarities of two aggregated blocks) and
`block_map_scores` (a row block's per-(r, layer) scores from its similarities to the whole
pool, the maps on two explicit leading axes, R then Y). The Dask tasks call them per task
block (its aggregates stored once), per pair of task blocks and per block row, with the
similarity table in between on disk (`block_patch_scores` averages a row).
`pool_patch_scores`, the in-memory engine, calls the same three with the whole pool as one
block, one (r, layer) map at a time: each map is aggregated once for the pool, its GEMMs cover
the upper triangle of tiles, and memory holds one map's (N, L, N) table, never all R * Y of them.
"""

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from ._lnamd import aggregate_tokens
from ._maps import average_scores
from ._msm import nearest_similarities, neighbour_count, scores_from_similarities

__all__ = ["block_aggregates", "block_map_scores", "block_pair_similarities", "block_patch_scores", "pool_patch_scores"]


def pool_patch_scores(
    layer_tokens: Sequence[Tensor],
    grid: tuple[int, int],
    r_list: Sequence[int] = (1, 3, 5),
    *,
    interval: float = 0.3,
    tile: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Patch scores of one pool in memory, averaged over feature layers and aggregation degrees.

    Parameters
    ----------
    layer_tokens : sequence of Y (N, L, C) float tensors
        Raw patch tokens of each feature layer (class token dropped), N >= 2.
    grid : (H, W)
        Patch grid, H * W = L.
    r_list : sequence of int
        LNAMD aggregation degrees.
    interval : float
        Fraction of the other images whose distances are averaged (`neighbour_count`).
    tile, compute_dtype
        As in `nearest_similarities`; LNAMD always runs in float32.

    Returns
    -------
    patch_scores : (N, L) float32 tensor

    Notes
    -----
    Holds one (r, layer) map's (N, L, N) float32 similarity table, 4 N^2 L bytes, a few times
    over while its distances are taken, plus one (tile L, tile L) product.
    """
    if not layer_tokens:
        raise ValueError("layer_tokens is empty: at least one feature layer is needed")
    if not r_list:
        raise ValueError("r_list is empty: at least one aggregation degree is needed")
    n_images = layer_tokens[0].shape[0]
    k = neighbour_count(n_images, interval)
    own_index = torch.arange(n_images, device=layer_tokens[0].device)
    per_map = []
    for r in r_list:
        for tokens in layer_tokens:
            aggregated = list(block_aggregates([tokens], grid, [r]))
            similarities, _ = block_pair_similarities(aggregated, None, tile=tile, compute_dtype=compute_dtype)
            per_map.append(block_map_scores(similarities.unflatten(0, (1, 1)), own_index, k)[0, 0])
    return average_scores(torch.stack(per_map).unflatten(0, (len(r_list), len(layer_tokens))))


def block_aggregates(layer_tokens: Sequence[Tensor], grid: tuple[int, int], r_list: Sequence[int]) -> Iterator[Tensor]:
    """LNAMD tokens of a block of images for every (r, layer) map, r major (the order of the map axis).

    Parameters
    ----------
    layer_tokens : sequence of Y (B, L, C) float tensors
        Raw patch tokens of the block, one tensor per feature layer.
    grid : (H, W)
        Patch grid, H * W = L.
    r_list : sequence of int
        LNAMD aggregation degrees.

    Yields
    ------
    aggregated : (B, L, C) float32 tensor
        `aggregate_tokens` of layer y at degree r, for (r, y) in ``r_list`` x layers order:
        R * Y tensors, one at a time, so a caller can store each before the next is made.
    """
    for r in r_list:
        for tokens in layer_tokens:
            yield aggregate_tokens(tokens, grid, r)


def block_pair_similarities(
    aggregated_a: Sequence[Tensor],
    aggregated_b: Sequence[Tensor] | None,
    *,
    tile: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Nearest-patch similarities between two blocks of a pool's images, for every (r, layer) map.

    Parameters
    ----------
    aggregated_a : sequence of M (Ba, L, C) float tensors
        LNAMD tokens of block a, one tensor per map (`block_aggregates`). Only indexed, one
        map at a time, so a sequence that reads each map when indexed keeps one map in memory.
    aggregated_b : sequence of M (Bb, L, C) float tensors, or None
        Block b; None when b is block a itself (only the upper triangle of its tiles is
        computed, and the two results are one tensor).
    tile, compute_dtype
        As in `nearest_similarities`.

    Returns
    -------
    a_to_b : (M, Ba, L, Bb) tensor
    b_to_a : (M, Bb, L, Ba) tensor
        See `nearest_similarities`, for each map (axis 0).
    """
    per_map_ab, per_map_ba = [], []
    for m in range(len(aggregated_a)):
        za = aggregated_a[m]
        zb = za if aggregated_b is None else aggregated_b[m]
        ab, ba = nearest_similarities(za, zb, compute_dtype=compute_dtype, tile=tile)
        per_map_ab.append(ab)
        per_map_ba.append(ba)
    a_to_b = torch.stack(per_map_ab)
    return a_to_b, a_to_b if aggregated_b is None else torch.stack(per_map_ba)


def block_map_scores(similarities: Tensor, own_index: Tensor, k: int) -> Tensor:
    """Per-(r, layer) patch scores of a block of images from their similarities to the whole pool.

    Parameters
    ----------
    similarities : (R, Y, B, L, N) float tensor
        Row block of the pool's similarity table for each (r, layer), all N columns filled.
    own_index : (B,) int64 tensor
        Column of each row's own image in the pool.
    k : int
        As in `scores_from_similarities`.

    Returns
    -------
    map_scores : (R, Y, B, L) float32 tensor
    """
    per_map = [scores_from_similarities(s, own_index, k) for s in similarities.flatten(0, 1)]  # R*Y of (B, L)
    return torch.stack(per_map).unflatten(0, similarities.shape[:2])


def block_patch_scores(similarities: Tensor, own_index: Tensor, k: int) -> Tensor:
    """Patch scores of a block of images, averaged over layers and aggregation degrees.

    Parameters
    ----------
    similarities, own_index, k
        As in `block_map_scores`.

    Returns
    -------
    patch_scores : (B, L) float32 tensor
    """
    return average_scores(block_map_scores(similarities, own_index, k))

"""Per-pool computation: layer tokens -> LNAMD -> MSM -> patch scores averaged over (r, layer).

Two functions hold the arithmetic of a block of a pool's images, with the (r, layer) maps on
two explicit leading axes, R then Y: `block_pair_similarities` (LNAMD and the nearest-patch
similarities of two blocks) and `block_map_scores` (a row block's per-(r, layer) scores from
its similarities to the whole pool). The Dask tasks call them per pair of task blocks and per
block row, with the similarity table in between on disk (`block_patch_scores` averages a row).
`pool_patch_scores`, the in-memory engine, calls the same two with the whole pool as one block,
one (r, layer) map at a time: each map is aggregated once for the pool, its GEMMs cover the
upper triangle of tiles, and memory holds one map's (N, L, N) table, never all R * Y of them.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from ._lnamd import aggregate_tokens
from ._maps import average_scores
from ._msm import nearest_similarities, neighbour_count, scores_from_similarities

__all__ = ["block_map_scores", "block_pair_similarities", "block_patch_scores", "pool_patch_scores"]


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
            similarities, _ = block_pair_similarities([tokens], None, grid, [r], tile=tile, compute_dtype=compute_dtype)
            per_map.append(block_map_scores(similarities, own_index, k)[0, 0])
    return average_scores(torch.stack(per_map).unflatten(0, (len(r_list), len(layer_tokens))))


def block_pair_similarities(
    tokens_a: Sequence[Tensor],
    tokens_b: Sequence[Tensor] | None,
    grid: tuple[int, int],
    r_list: Sequence[int],
    *,
    tile: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Nearest-patch similarities between two blocks of a pool's images, for every (r, layer).

    Parameters
    ----------
    tokens_a : sequence of Y (Ba, L, C) float tensors
        Raw patch tokens of block a, one tensor per feature layer.
    tokens_b : sequence of Y (Bb, L, C) float tensors, or None
        Block b; None when b is block a itself (only the upper triangle of its tiles is
        computed, and the two results are one tensor).
    grid : (H, W)
        Patch grid, H * W = L.
    r_list : sequence of int
        LNAMD aggregation degrees.
    tile, compute_dtype
        As in `nearest_similarities`.

    Returns
    -------
    a_to_b : (R, Y, Ba, L, Bb) tensor
    b_to_a : (R, Y, Bb, L, Ba) tensor
        See `nearest_similarities`, for each aggregation degree (axis 0) and layer (axis 1).
    """
    per_map_ab, per_map_ba = [], []
    for r in r_list:
        for layer, layer_a in enumerate(tokens_a):
            za = aggregate_tokens(layer_a, grid, r)
            zb = za if tokens_b is None else aggregate_tokens(tokens_b[layer], grid, r)
            ab, ba = nearest_similarities(za, zb, compute_dtype=compute_dtype, tile=tile)
            per_map_ab.append(ab)
            per_map_ba.append(ba)
    maps = (len(r_list), len(tokens_a))
    a_to_b = torch.stack(per_map_ab).unflatten(0, maps)
    return a_to_b, a_to_b if tokens_b is None else torch.stack(per_map_ba).unflatten(0, maps)


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

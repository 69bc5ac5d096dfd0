"""Per-pool computation: layer tokens -> LNAMD -> MSM -> patch scores averaged over (r, layer).

`pool_patch_scores` scores a whole pool in memory; the Dask tasks score it block by block with
`block_pair_similarities` (one task per pair of image blocks) and `block_patch_scores` (one per
block row). Both keep the (r, layer) maps on two explicit leading axes, R then Y.
"""

from collections.abc import Sequence

import torch
from torch import Tensor

from ._lnamd import aggregate_tokens
from ._maps import average_scores
from ._msm import mutual_scores, nearest_similarities, scores_from_similarities

__all__ = ["block_pair_similarities", "block_patch_scores", "pool_patch_scores"]


def pool_patch_scores(
    layer_tokens: Sequence[Tensor],
    grid: tuple[int, int],
    r_list: Sequence[int] = (1, 3, 5),
    *,
    interval: float = 0.3,
    tile: int | None = None,
    compute_dtype: torch.dtype | None = None,
) -> Tensor:
    """Patch scores of one pool, averaged over feature layers and aggregation degrees.

    Parameters
    ----------
    layer_tokens : sequence of Y (N, L, C) float tensors
        Raw patch tokens of each feature layer (class token dropped).
    grid : (H, W)
        Patch grid, H * W = L.
    r_list : sequence of int
        LNAMD aggregation degrees.
    interval, tile, compute_dtype
        As in `mutual_scores`; LNAMD always runs in the tokens' dtype.

    Returns
    -------
    patch_scores : (N, L) float32 tensor
    """
    if not layer_tokens:
        raise ValueError("layer_tokens is empty: at least one feature layer is needed")
    if not r_list:
        raise ValueError("r_list is empty: at least one aggregation degree is needed")
    per_degree = []
    for r in r_list:
        per_layer = [
            mutual_scores(aggregate_tokens(tokens, grid, r), interval=interval, tile=tile, compute_dtype=compute_dtype)
            for tokens in layer_tokens
        ]
        per_degree.append(torch.stack(per_layer))
    return average_scores(torch.stack(per_degree))


def block_pair_similarities(
    tokens_a: Sequence[Tensor],
    tokens_b: Sequence[Tensor] | None,
    grid: tuple[int, int],
    r_list: Sequence[int],
    *,
    compute_dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Nearest-patch similarities between two blocks of a pool's images, for every (r, layer).

    Parameters
    ----------
    tokens_a : sequence of Y (Ba, L, C) float tensors
        Raw patch tokens of block a, one tensor per feature layer.
    tokens_b : sequence of Y (Bb, L, C) float tensors, or None
        Block b; None when b is block a itself (only half of its products are computed).
    grid : (H, W)
        Patch grid, H * W = L.
    r_list : sequence of int
        LNAMD aggregation degrees.
    compute_dtype : torch.dtype, optional
        As in `nearest_similarities`.

    Returns
    -------
    a_to_b : (R, Y, Ba, L, Bb) tensor
    b_to_a : (R, Y, Bb, L, Ba) tensor
        See `nearest_similarities`, for each aggregation degree (axis 0) and layer (axis 1).
    """
    per_degree_ab, per_degree_ba = [], []
    for r in r_list:
        per_layer_ab, per_layer_ba = [], []
        for layer, layer_a in enumerate(tokens_a):
            za = aggregate_tokens(layer_a, grid, r)
            zb = za if tokens_b is None else aggregate_tokens(tokens_b[layer], grid, r)
            ab, ba = nearest_similarities(za, zb, compute_dtype=compute_dtype)
            per_layer_ab.append(ab)
            per_layer_ba.append(ba)
        per_degree_ab.append(torch.stack(per_layer_ab))
        per_degree_ba.append(torch.stack(per_layer_ba))
    return torch.stack(per_degree_ab), torch.stack(per_degree_ba)


def block_patch_scores(similarities: Tensor, own_index: Tensor, k: int) -> Tensor:
    """Patch scores of a block of images from their similarities to every image of the pool.

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
    patch_scores : (B, L) float32 tensor
        Averaged over layers and aggregation degrees.
    """
    maps = similarities.flatten(0, 1)  # (R*Y, B, L, N)
    per_map = torch.stack([scores_from_similarities(s, own_index, k) for s in maps])  # (R*Y, B, L)
    return average_scores(per_map.unflatten(0, similarities.shape[:2]))  # (R, Y, B, L) -> (B, L)

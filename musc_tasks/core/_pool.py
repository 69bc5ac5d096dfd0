"""The whole per-pool computation: layer tokens -> LNAMD -> MSM -> averaged patch scores."""

from collections.abc import Sequence

import torch
from torch import Tensor

from ._lnamd import aggregate_tokens
from ._maps import average_scores
from ._msm import mutual_scores

__all__ = ["pool_patch_scores"]


def pool_patch_scores(
    layer_tokens: Sequence[Tensor],
    grid: tuple[int, int],
    r_list: Sequence[int] = (1, 3, 5),
    *,
    interval: float = 0.3,
    block: int | None = None,
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
    interval, block, compute_dtype
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
            mutual_scores(
                aggregate_tokens(tokens, grid, r), interval=interval, block=block, compute_dtype=compute_dtype
            )
            for tokens in layer_tokens
        ]
        per_degree.append(torch.stack(per_layer))
    return average_scores(torch.stack(per_degree))

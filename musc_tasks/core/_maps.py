"""Anomaly maps and raw image scores from patch scores (MUSC_SPEC §5)."""

import torch.nn.functional as F
from torch import Tensor

__all__ = ["upsample_maps", "image_scores", "average_scores"]


def average_scores(scores: Tensor) -> Tensor:
    """Average per-(r, layer) patch scores: over layers, then over aggregation degrees.

    Parameters
    ----------
    scores : (R, Y, N, L) float tensor
        Patch scores for R aggregation degrees and Y feature layers.

    Returns
    -------
    averaged : (N, L) float32 tensor
        Accumulated in float64, cast once at the end.
    """
    if scores.ndim != 4:
        raise ValueError(f"scores must be (R, Y, N, L), got shape {tuple(scores.shape)}")
    return scores.double().mean(dim=1).mean(dim=0).float()


def upsample_maps(patch_scores: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling (align_corners=True) of patch-grid scores to pixel maps.

    Parameters
    ----------
    patch_scores : (N, L) float tensor
        L = H * W, row-major.
    grid : (H, W)
    size : (height, width)
        Output size in pixels: (S, S) for scoring and metrics, the original size for masks.

    Returns
    -------
    maps : (N, height, width) float32 tensor
    """
    h, w = grid
    n, length = patch_scores.shape
    if h * w != length:
        raise ValueError(f"grid {grid} has {h * w} patches but patch_scores have L={length}")
    grids = patch_scores.float().reshape(n, 1, h, w)
    maps = F.interpolate(grids, size=tuple(size), mode="bilinear", align_corners=True)
    return maps[:, 0]


def image_scores(maps: Tensor) -> Tensor:
    """Raw image score: the maximum of each (S, S) map.

    Parameters
    ----------
    maps : (N, S, S) float tensor

    Returns
    -------
    scores : (N,) float32 tensor
    """
    return maps.flatten(1).amax(dim=1)

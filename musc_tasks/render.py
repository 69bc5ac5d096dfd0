"""Binary masks, heatmap overlays and region rows for the published results."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from skimage.measure import label, regionprops_table

from .atomic import write_atomic

__all__ = ["region_rows", "mask_pixels", "heatmap_overlay", "write_png"]

logger = logging.getLogger(__name__)

# Anchors of a dark-to-bright ramp (black, violet, crimson, orange, pale yellow), ordered
# by lightness so that brighter always means more anomalous, also in greyscale print-outs.
HEATMAP_ANCHORS = np.array(
    [
        [0.00, 0, 0, 6],
        [0.20, 60, 12, 100],
        [0.40, 135, 30, 105],
        [0.60, 205, 65, 65],
        [0.80, 248, 150, 20],
        [1.00, 250, 250, 170],
    ],
    dtype=np.float64,
)
# Fixed so that identical pixels always give identical PNG bytes.
PNG_COMPRESS_LEVEL = 6

_REGION_DTYPES = {
    "region": np.int32,
    "bbox_x0": np.int32,
    "bbox_y0": np.int32,
    "bbox_x1": np.int32,
    "bbox_y1": np.int32,
    "area_px": np.int64,
    "area_fraction": np.float64,
    "max_score": np.float64,
    "mean_score": np.float64,
    "centroid_x": np.float64,
    "centroid_y": np.float64,
}


def _check_map(score_map: np.ndarray, name: str) -> np.ndarray:
    score_map = np.asarray(score_map)
    if score_map.ndim != 2 or not np.issubdtype(score_map.dtype, np.number):
        raise ValueError(f"{name} must be a 2-D numeric array, got shape {score_map.shape} dtype {score_map.dtype}")
    return score_map


def region_rows(mask: np.ndarray, score_map: np.ndarray) -> dict[str, np.ndarray]:
    """Describe the 8-connected regions of a mask, strongest first.

    Parameters
    ----------
    mask : (H, W) bool array
        Anomalous pixels; diagonal neighbours belong to the same region.
    score_map : (H, W) float array
        Pixel scores in the same pixels as ``mask``.

    Returns
    -------
    columns : dict of str to (R,) array
        ``region`` (int32, 1 = highest ``max_score``; ties keep the raster order of each
        region's first pixel), ``bbox_x0``, ``bbox_y0``, ``bbox_x1``, ``bbox_y1`` (int32,
        x1 and y1 exclusive), ``area_px`` (int64), ``area_fraction`` (of H * W),
        ``max_score``, ``mean_score`` (of ``score_map`` within the region), ``centroid_x``,
        ``centroid_y`` (float64, mean column and row index, so pixel centres are at integers).
        R = 0 gives zero-length arrays of those dtypes.
    """
    mask = np.asarray(mask)
    if mask.ndim != 2 or mask.dtype != np.bool_:
        raise ValueError(f"mask must be a 2-D bool array, got shape {mask.shape} dtype {mask.dtype}")
    score_map = _check_map(score_map, "score_map")
    if score_map.shape != mask.shape:
        raise ValueError(f"score_map must have the mask's shape {mask.shape}, got {score_map.shape}")
    labels = label(mask, connectivity=2)
    props = regionprops_table(
        labels,
        intensity_image=score_map.astype(np.float64),
        properties=("label", "bbox", "area", "centroid", "intensity_max", "intensity_mean"),
    )
    # lexsort sorts by its last key first.
    order = np.lexsort((props["label"], -props["intensity_max"]))
    columns = {
        "region": np.arange(1, order.size + 1),
        "bbox_x0": props["bbox-1"][order],
        "bbox_y0": props["bbox-0"][order],
        "bbox_x1": props["bbox-3"][order],
        "bbox_y1": props["bbox-2"][order],
        "area_px": props["area"][order],
        "area_fraction": props["area"][order] / mask.size,
        "max_score": props["intensity_max"][order],
        "mean_score": props["intensity_mean"][order],
        "centroid_x": props["centroid-1"][order],
        "centroid_y": props["centroid-0"][order],
    }
    return {name: columns[name].astype(dtype) for name, dtype in _REGION_DTYPES.items()}


def mask_pixels(score_map: np.ndarray, threshold: float) -> np.ndarray:
    """A binary mask image of the pixels scoring above a threshold.

    Parameters
    ----------
    score_map : (H, W) float array
    threshold : float
        Pixels with ``score > threshold`` are anomalous.

    Returns
    -------
    mask : (H, W) uint8 array
        255 where anomalous, 0 elsewhere (so the PNG is viewable as is).
    """
    score_map = _check_map(score_map, "score_map")
    if not np.isfinite(threshold):
        raise ValueError(f"threshold must be finite, got {threshold}")
    return np.where(score_map > threshold, np.uint8(255), np.uint8(0))


def heatmap_overlay(
    image_rgb: np.ndarray,
    score_map: np.ndarray,
    *,
    vmin: float,
    vmax: float,
    alpha: float = 0.5,
) -> np.ndarray:
    """Colour a score map and blend it over the image.

    Parameters
    ----------
    image_rgb : (H, W, 3) uint8 array
    score_map : (H, W) float array
        Clipped to [vmin, vmax]; NaN counts as vmin.
    vmin, vmax : float
        Score range of the colour ramp (``HEATMAP_ANCHORS``). The same range across a
        product keeps colours comparable between images. ``vmin >= vmax`` gives a flat map
        in the lowest colour.
    alpha : float
        Weight of the colour map in [0, 1]; 0 returns the image.

    Returns
    -------
    overlay : (H, W, 3) uint8 array
    """
    image_rgb = np.asarray(image_rgb)
    if image_rgb.ndim != 3 or image_rgb.shape[2] != 3 or image_rgb.dtype != np.uint8:
        raise ValueError(f"image_rgb must be (H, W, 3) uint8, got shape {image_rgb.shape} dtype {image_rgb.dtype}")
    score_map = _check_map(score_map, "score_map")
    if score_map.shape != image_rgb.shape[:2]:
        raise ValueError(f"score_map must have the image's shape {image_rgb.shape[:2]}, got {score_map.shape}")
    if not (np.isfinite(vmin) and np.isfinite(vmax)):
        raise ValueError(f"vmin and vmax must be finite, got {vmin}, {vmax}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if vmin < vmax:
        fraction = (np.nan_to_num(score_map.astype(np.float64), nan=vmin) - vmin) / (vmax - vmin)
        fraction = np.clip(fraction, 0.0, 1.0)
    else:
        fraction = np.zeros(score_map.shape, np.float64)
    colours = np.stack(
        [np.interp(fraction, HEATMAP_ANCHORS[:, 0], HEATMAP_ANCHORS[:, channel]) for channel in (1, 2, 3)],
        axis=-1,
    )  # (H, W, 3)
    blended = (1.0 - alpha) * image_rgb + alpha * colours
    return np.clip(np.rint(blended), 0, 255).astype(np.uint8)


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Write a greyscale or RGB PNG atomically, with identical bytes for identical pixels.

    PIL writes no timestamp or text chunk unless asked, and the compression level is
    fixed, so the file depends only on the pixels (and the zlib build).

    Parameters
    ----------
    path : Path
        Parent directories are created; readers see the old file or the new one.
    pixels : (H, W) or (H, W, 3) uint8 array
        A mask (0/255, from ``mask_pixels``) or an RGB image.

    Returns
    -------
    path : Path
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"pixels must be (H, W) or (H, W, 3) uint8, got shape {pixels.shape} dtype {pixels.dtype}")
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    write_atomic(path, buffer.getvalue())
    logger.debug("wrote %s", path)
    return Path(path)

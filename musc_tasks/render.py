"""Binary masks, heatmap overlays and region rows for the published results."""

from __future__ import annotations

import functools
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_erosion, find_objects
from skimage.measure import label, regionprops, regionprops_table

from .atomic import write_atomic

__all__ = [
    "CROP_MARGIN_PX",
    "CROP_MIN_SIDE",
    "CROP_QUALITY",
    "HEATMAP_FORMATS",
    "crop_box",
    "encode_crop",
    "empty_mask_png",
    "encode_image",
    "heatmap_legend",
    "heatmap_overlay",
    "line_width",
    "image_mask",
    "no_regions",
    "region_rows",
    "write_png",
]

logger = logging.getLogger(__name__)

# The upper three quarters of viridis (perceptually uniform, readable with the common colour
# vision deficiencies and in greyscale): blue just above the floor to yellow at the maximum,
# so the weakest coloured pixel still stands apart from a dark part.
HEATMAP_ANCHORS = np.array(
    [
        [0.00, 59, 82, 139],
        [0.25, 44, 114, 142],
        [0.50, 33, 145, 140],
        [0.75, 94, 201, 98],
        [1.00, 253, 231, 37],
    ],
    dtype=np.float64,
)
# Drawn over the colours: the mask's contour and the regions' boxes (light on dark, dark on light).
CONTOUR_RGB = (255, 255, 255)
BOX_RGB = (230, 0, 126)
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


def _region_props(mask: np.ndarray, score_map: np.ndarray) -> dict[str, np.ndarray]:
    """The plain path: label the whole mask; labels follow the raster order of the regions' first pixels."""
    labels = label(mask, connectivity=2)
    props = regionprops_table(
        labels,
        intensity_image=score_map.astype(np.float64),
        properties=("label", "bbox", "area", "centroid", "intensity_max", "intensity_mean"),
    )
    return {**props, "first": props["label"]}


def _region_props_by_cells(mask: np.ndarray, score_map: np.ndarray, cell: int) -> dict[str, np.ndarray]:
    """The fast path: label cells of cell x cell pixels, then each cell region's pixels within its box.

    ``first`` is the raster index of each region's first pixel in the whole mask.
    """
    height, width = mask.shape
    rows, cols = -(-height // cell), -(-width // cell)
    padded = np.zeros((rows * cell, cols * cell), bool)
    padded[:height, :width] = mask
    # OR of strided views: numpy's any() over the short axes of a (rows, c, cols, c) view is ~20x slower
    column_cells = functools.reduce(np.logical_or, (padded[:, k::cell] for k in range(cell)))
    cells = functools.reduce(np.logical_or, (column_cells[k::cell] for k in range(cell)))
    cell_labels = label(cells, connectivity=2)
    found: dict[str, list] = {key: [] for key in _CELL_PROPS}
    for number, box in enumerate(find_objects(cell_labels), start=1):
        y0, x0 = box[0].start * cell, box[1].start * cell
        y1, x1 = min(height, box[0].stop * cell), min(width, box[1].stop * cell)
        # only this cell region's pixels: another one's cells may lie inside its box
        own = np.repeat(np.repeat(cell_labels[box] == number, cell, axis=0), cell, axis=1)[: y1 - y0, : x1 - x0]
        labels = label(mask[y0:y1, x0:x1] & own, connectivity=2)
        crop_scores = score_map[y0:y1, x0:x1].astype(np.float64)
        for region in regionprops(labels, intensity_image=crop_scores, offset=(y0, x0)):
            top, left, bottom, right = region.bbox  # in the crop
            first_y, first_x = region.coords[0]  # in the mask: argwhere's raster order
            found["bbox-0"].append(top + y0)
            found["bbox-1"].append(left + x0)
            found["bbox-2"].append(bottom + y0)
            found["bbox-3"].append(right + x0)
            found["area"].append(region.area)
            found["centroid-0"].append(region.centroid[0])
            found["centroid-1"].append(region.centroid[1])
            found["intensity_max"].append(region.intensity_max)
            found["intensity_mean"].append(region.intensity_mean)
            found["first"].append(first_y * width + first_x)
    return {key: np.asarray(values, dtype=_CELL_PROPS[key]) for key, values in found.items()}


_CELL_PROPS = {
    "bbox-0": np.int64,
    "bbox-1": np.int64,
    "bbox-2": np.int64,
    "bbox-3": np.int64,
    "area": np.float64,
    "centroid-0": np.float64,
    "centroid-1": np.float64,
    "intensity_max": np.float64,
    "intensity_mean": np.float64,
    "first": np.int64,
}


def region_rows(mask: np.ndarray, score_map: np.ndarray, *, working_side: int | None = 1024) -> dict[str, np.ndarray]:
    """Describe the 8-connected regions of a mask, strongest first.

    A mask whose long side exceeds ``working_side`` is first labelled in cells of c x c
    pixels (c the smallest that brings the long side within ``working_side``; a cell is on
    when any of its pixels is), then each cell region's own pixels are labelled at full
    resolution within its box. Pixels connected in the mask lie in connected cells, so each
    region falls whole in one cell region: the rows equal those of labelling the whole mask
    at once (``working_side=None``, the plain path), at a cost that follows the regions'
    boxes rather than the image's size.

    Parameters
    ----------
    mask : (H, W) bool array
        Anomalous pixels; diagonal neighbours belong to the same region.
    score_map : (H, W) float array
        Pixel scores in the same pixels as ``mask``.
    working_side : int, optional
        Long side of the cell grid; None labels the whole mask at once.

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
    if working_side is not None and working_side < 1:
        raise ValueError(f"working_side must be >= 1 or None, got {working_side}")
    cell = 1 if working_side is None else -(-max(mask.shape) // working_side)
    props = _region_props(mask, score_map) if cell == 1 else _region_props_by_cells(mask, score_map, cell)
    # lexsort sorts by its last key first.
    order = np.lexsort((props["first"], -props["intensity_max"]))
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


def no_regions() -> dict[str, np.ndarray]:
    """The columns of ``region_rows`` for a mask without regions: zero-length arrays of its dtypes."""
    return {name: np.zeros(0, dtype) for name, dtype in _REGION_DTYPES.items()}


# The rule that ties masks to flags (README "Flags, masks and regions"): an image has a mask
# only when it is flagged; its mask is the pixels above the product's pixel threshold or, when
# none are, its own peak: the pixels above half-way from the map's median (the part's normal
# level) to its maximum, as a peak's width is read at half its height above the background.
MASK_RULES = ("pixel_threshold", "peak")
PEAK_FRACTION = 0.5


def _float32_below(value: float) -> float:
    """The largest float32 at or below ``value``: ``x > it`` equals ``x > value`` for every float32 x."""
    rounded = np.float32(value)
    if float(rounded) > value:
        rounded = np.nextafter(rounded, np.float32(-np.inf))
    return float(rounded)


def image_mask(
    score_map: np.ndarray, pixel_threshold: float, *, flagged: bool
) -> tuple[np.ndarray, str | None, float | None]:
    """An image's mask under the one rule that ties masks and regions to the image's flag.

    Parameters
    ----------
    score_map : (H, W) float32 array
        The image's pixel scores (the stored map upsampled to the capture's size).
    pixel_threshold : float
        The product's pixel threshold of the day.
    flagged : bool
        Whether the image's score is above the product's image threshold.

    Returns
    -------
    mask : (H, W) bool array
        ``score_map > level``: empty when not flagged, otherwise never empty.
    rule : {"pixel_threshold", "peak"} or None
        None when not flagged; ``"pixel_threshold"`` when some pixel scores above the
        product's pixel threshold (the mask is then exactly ``score_map > pixel_threshold``);
        ``"peak"`` otherwise.
    level : float or None
        A float32 value (so comparisons in float32 and float64 give the same pixels): the
        pixel threshold rounded down to float32, or for ``"peak"``
        ``median + PEAK_FRACTION * (max - median)`` of ``score_map`` rounded down and at most
        the float32 just below the maximum, so the maximum is always in the mask.
    """
    score_map = _check_map(score_map, "score_map").astype(np.float32, copy=False)
    if not np.isfinite(pixel_threshold):
        raise ValueError(f"pixel_threshold must be finite, got {pixel_threshold}")
    if not flagged:
        return np.zeros(score_map.shape, bool), None, None
    level = _float32_below(pixel_threshold)
    peak = score_map.max()
    if peak > level:
        return score_map > np.float32(level), "pixel_threshold", level
    median = float(np.median(score_map))
    halfway = _float32_below(median + PEAK_FRACTION * (float(peak) - median))
    level = min(halfway, float(np.nextafter(peak, np.float32(-np.inf))))
    return score_map > np.float32(level), "peak", level


def ramp_colours(fraction: np.ndarray) -> np.ndarray:
    """Colours of ``HEATMAP_ANCHORS`` at fractions in [0, 1]: (..., 3) float64 array."""
    return np.stack(
        [np.interp(fraction, HEATMAP_ANCHORS[:, 0], HEATMAP_ANCHORS[:, channel]) for channel in (1, 2, 3)], axis=-1
    )


def line_width(shape: tuple[int, ...]) -> int:
    """Contour and box width in pixels: about 1/500 of the long side, at least 1."""
    return max(1, round(max(shape[:2]) / 500))


def heatmap_overlay(
    image_rgb: np.ndarray,
    score_map: np.ndarray,
    *,
    floor: float,
    vmax: float,
    alpha: float = 0.6,
    mask: np.ndarray | None = None,
    boxes: np.ndarray | None = None,
) -> np.ndarray:
    """Colour the pixels that score above a floor, blend them over the image, draw contour and boxes.

    Pixels at or below ``floor`` keep the image's own colours (no darkening of the part);
    above it the colour ramp runs from ``floor`` (blue) to ``vmax`` (yellow).

    Parameters
    ----------
    image_rgb : (H, W, 3) uint8 array
    score_map : (H, W) float array
        NaN counts as below the floor.
    floor, vmax : float
        Score range of the colour ramp (``HEATMAP_ANCHORS``); the publish stage uses the
        product's pixel threshold and maximum, stored as ``heatmap_min``/``heatmap_max``.
        ``vmax <= floor`` colours every pixel above the floor in the top colour.
    alpha : float
        Weight of the colour in [0, 1] where it is drawn; 0 leaves the image's pixels.
    mask : (H, W) bool array, optional
        Its contour (mask pixels with a neighbour outside it) is drawn in ``CONTOUR_RGB``.
    boxes : (R, 4) int array, optional
        Region boxes ``x0, y0, x1, y1`` (x1, y1 exclusive) in these pixels, drawn in ``BOX_RGB``.

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
    if not (np.isfinite(floor) and np.isfinite(vmax)):
        raise ValueError(f"floor and vmax must be finite, got {floor}, {vmax}")
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    overlay = image_rgb.copy()
    scores = score_map.astype(np.float64)
    above = scores > floor  # NaN compares False: below the floor, with no replacing pass over the map
    if above.any():
        values = scores[above]
        fraction = np.clip((values - floor) / (vmax - floor), 0.0, 1.0) if vmax > floor else np.ones_like(values)
        blended = (1.0 - alpha) * image_rgb[above] + alpha * ramp_colours(fraction)
        overlay[above] = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
    width = line_width(image_rgb.shape)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != score_map.shape:
            raise ValueError(f"mask must have the image's shape {score_map.shape}, got {mask.shape}")
        overlay[mask & ~binary_erosion(mask, np.ones((2 * width + 1, 2 * width + 1), bool))] = CONTOUR_RGB
    for x0, y0, x1, y1 in np.asarray(boxes if boxes is not None else np.zeros((0, 4)), dtype=np.int64):
        _draw_box(overlay, int(x0), int(y0), int(x1), int(y1), width)
    return overlay


def _draw_box(pixels: np.ndarray, x0: int, y0: int, x1: int, y1: int, width: int) -> None:
    """A box outline around x0 <= x < x1, y0 <= y < y1, growing outwards where the image allows."""
    h, w = pixels.shape[:2]
    top, bottom = max(0, y0 - width), min(h, y1 + width)
    left, right = max(0, x0 - width), min(w, x1 + width)
    pixels[top:y0, left:right] = BOX_RGB
    pixels[y1:bottom, left:right] = BOX_RGB
    pixels[top:bottom, left:x0] = BOX_RGB
    pixels[top:bottom, x1:right] = BOX_RGB


def heatmap_legend(floor: float, vmax: float, *, width: int = 480, height: int = 120) -> np.ndarray:
    """The colour ramp of ``heatmap_overlay`` with its scale, contour and box keys, as an RGB image.

    Parameters
    ----------
    floor, vmax : float
        The product's ``heatmap_min`` and ``heatmap_max``.
    width, height : int
        Size of the legend in pixels.

    Returns
    -------
    legend : (height, width, 3) uint8 array
    """
    from PIL import ImageDraw, ImageFont

    legend = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(legend)
    font = ImageFont.load_default()
    margin, bar_top, bar_bottom = 12, 28, 58
    ramp = ramp_colours(np.linspace(0.0, 1.0, width - 2 * margin))
    bar = np.broadcast_to(np.rint(ramp).astype(np.uint8), (bar_bottom - bar_top, width - 2 * margin, 3))
    legend.paste(Image.fromarray(np.ascontiguousarray(bar)), (margin, bar_top))
    draw.text((margin, 6), "anomaly score (uncoloured: at or below the pixel threshold)", fill=(0, 0, 0), font=font)
    draw.text((margin, bar_bottom + 4), f"{floor:.4g} threshold", fill=(0, 0, 0), font=font)
    high = f"{vmax:.4g} max"
    draw.text((width - margin - draw.textlength(high, font=font), bar_bottom + 4), high, fill=(0, 0, 0), font=font)
    key_y = bar_bottom + 30
    draw.rectangle((margin, key_y, margin + 24, key_y + 12), outline=CONTOUR_RGB, fill=(60, 60, 60), width=2)
    draw.text((margin + 32, key_y), "mask contour", fill=(0, 0, 0), font=font)
    draw.rectangle((margin + 150, key_y, margin + 174, key_y + 12), outline=BOX_RGB, width=2)
    draw.text((margin + 182, key_y), "region box", fill=(0, 0, 0), font=font)
    return np.asarray(legend)


HEATMAP_FORMATS = {"jpeg": ".jpg", "webp": ".webp", "png": ".png"}


def encode_image(pixels: np.ndarray, image_format: str, quality: int, *, subsampling: str = "4:2:0") -> bytes:
    """Encode an RGB image; identical pixels and settings give identical bytes.

    Parameters
    ----------
    pixels : (H, W, 3) uint8 array
    image_format : {"jpeg", "webp", "png"}
        ``png`` and ``webp`` at quality 100 are lossless.
    quality : int
        1-100 for JPEG and WebP (ignored for PNG).
    subsampling : {"4:2:0", "4:4:4"}
        JPEG chroma subsampling (ignored otherwise): ``4:4:4`` keeps colour at every pixel.

    Returns
    -------
    data : bytes
    """
    image = Image.fromarray(np.ascontiguousarray(pixels))
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=quality, optimize=True, subsampling=subsampling)
    elif image_format == "webp":
        image.save(buffer, format="WEBP", quality=quality, lossless=quality >= 100, method=4, exact=False)
    elif image_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        raise ValueError(f"image_format must be one of {sorted(HEATMAP_FORMATS)}, got {image_format!r}")
    return buffer.getvalue()


def write_png(path: Path, pixels: np.ndarray) -> Path:
    """Write a greyscale or RGB PNG atomically, with identical bytes for identical pixels.

    PIL writes no timestamp or text chunk unless asked, and the compression level is
    fixed, so the file depends only on the pixels (and the zlib build).

    Parameters
    ----------
    path : Path
        Parent directories are created; readers see the old file or the new one.
    pixels : (H, W) or (H, W, 3) uint8 array
        A mask (0 and 255) or an RGB image.

    Returns
    -------
    path : Path
    """
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or not (pixels.ndim == 2 or (pixels.ndim == 3 and pixels.shape[2] == 3)):
        raise ValueError(f"pixels must be (H, W) or (H, W, 3) uint8, got shape {pixels.shape} dtype {pixels.dtype}")
    write_atomic(path, _png_bytes(pixels))
    logger.debug("wrote %s", path)
    return Path(path)


@functools.lru_cache(maxsize=4)
def empty_mask_png(height: int, width: int) -> bytes:
    """The bytes ``write_png`` writes for an all-zero (height, width) mask, encoded once per size.

    Most images of a night are not flagged, so their masks are empty, and a camera's captures
    share one size: at 5 MP this saves a 40 ms encoding per image.
    """
    return _png_bytes(np.zeros((height, width), np.uint8))


def _png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return buffer.getvalue()


# Region crops (README "Outputs"): the capture itself around each region, at full resolution.
# Context on each side of a region: a quarter of its side, at least CROP_MARGIN_PX; and at
# least CROP_MIN_SIDE pixels a side, so a defect of a few pixels is shown with the part around it.
CROP_MARGIN_PX = 32
CROP_MIN_SIDE = 256
# A crop is looked at closely, zoomed: near-lossless and with colour at every pixel (a stain of
# a few pixels keeps its hue), unlike a heatmap's q85 4:2:0. They are few (flagged images only),
# so this costs little space (docs/performance.md).
CROP_QUALITY = 95


def _crop_span(low: int, high: int, length: int) -> tuple[int, int]:
    """One axis of ``crop_box``: ``[start, stop)`` around ``[low, high)`` within ``[0, length)``."""
    side = high - low
    want = max(CROP_MIN_SIDE, side + 2 * max(CROP_MARGIN_PX, -(-side // 4)))
    start = (low + high - want) // 2  # centred; want > side, so start <= low and start + want >= high
    stop = start + want
    if start < 0:  # moved inside the image rather than cut, so the minimum size holds where it fits
        start, stop = 0, stop - start
    if stop > length:
        start, stop = start - (stop - length), length
    return max(0, start), stop


def crop_box(bbox: tuple[int, int, int, int], size: tuple[int, int]) -> tuple[int, int, int, int]:
    """The part of a capture shown as a region's crop.

    Parameters
    ----------
    bbox : (x0, y0, x1, y1) ints
        The region's box in the capture's pixels, x1 and y1 exclusive (the ``regions`` table's).
    size : (width, height)
        The capture's upright size; the box lies inside it.

    Returns
    -------
    box : (x0, y0, x1, y1) ints
        Contains ``bbox``, inside the capture; on each axis the region's side plus a quarter
        of it (at least ``CROP_MARGIN_PX``) on both sides and at least ``CROP_MIN_SIDE``,
        centred on the region and moved inside the capture near an edge, so it is smaller
        only where the capture is.
    """
    x0, y0, x1, y1 = (int(v) for v in bbox)
    width, height = size
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise ValueError(f"bbox {bbox} must be a non-empty box inside the {width} x {height} capture")
    left, right = _crop_span(x0, x1, width)
    top, bottom = _crop_span(y0, y1, height)
    return left, top, right, bottom


def encode_crop(pixels: np.ndarray) -> bytes:
    """A region crop as JPEG at ``CROP_QUALITY`` with 4:4:4 chroma; identical pixels give identical bytes."""
    return encode_image(pixels, "jpeg", CROP_QUALITY, subsampling="4:4:4")

"""A small synthetic day: product photos cut from scikit-image's bundled images, with planted defects.

It gives the pipeline an offline, seconds-long input with known answers (MVTec-like layout):
``root/input/<product>/<name>.png`` and, for defective images only,
``root/ground_truth/<product>/<name>_mask.png`` (0/255, exactly the pixels the defect changed).

Products: "brick" and "gravel" are textures (crops at random offsets, like MVTec's texture
classes); "coffee" is an object (one fixed crop of the cup with small shifts and brightness
jitter). Defects: "scratch" (thin anti-aliased bright or dark curve), "stain" (coloured blob
with soft edges), "missing" (a chunk replaced by flat dark background); each covers 1-5 % of
the image. Everything derives from ``seed``, so equal seeds give byte-identical files.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image
from skimage import data as skdata

__all__ = ["DEFECT_KINDS", "PRODUCTS", "BadNight", "DemoImage", "DemoDay", "make_bad_night", "make_demo_day"]

log = logging.getLogger(__name__)

DefectKind = Literal["scratch", "stain", "missing"]
DEFECT_KINDS: tuple[DefectKind, ...] = ("scratch", "stain", "missing")
PRODUCTS = ("brick", "coffee", "gravel")

# Area of a planted defect as a fraction of the image.
_MIN_AREA, _MAX_AREA = 0.01, 0.05
# Side of the square cut from a texture source (512 px) before resizing to the output size.
_TEXTURE_CROP = 256
# The cup in coffee() (400 x 600): top-left corner and side of the fixed crop.
_COFFEE_TOP, _COFFEE_LEFT, _COFFEE_SIDE = 20, 150, 340
_COFFEE_SHIFT = 10
# Soft-alpha pixels below this are left untouched, so the mask edge is well defined.
_ALPHA_FLOOR = 0.1


@dataclass(frozen=True)
class DemoImage:
    """One generated photo and its truth."""

    product: str
    path: Path
    is_defective: bool
    defect_kind: DefectKind | None
    # The 0/255 ground-truth mask; None for good images.
    mask_path: Path | None


@dataclass(frozen=True)
class DemoDay:
    """Where a generated day lives and what it contains."""

    input_dir: Path
    ground_truth_dir: Path
    # Sorted by (product, file name).
    images: tuple[DemoImage, ...]


def make_demo_day(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    images_per_product: int = 12,
    defects_per_product: int = 3,
    size: int = 224,
) -> DemoDay:
    """Write a day of synthetic product photos with planted defects and their masks.

    Parameters
    ----------
    root : str or path-like
        Folder to write into; ``input/`` and ``ground_truth/`` are created below it and must
        not already hold files with the same names (they are overwritten).
    seed : int
        Decides crops, jitter, which images are defective, defect kinds and shapes.
    images_per_product : int
        Photos per product (>= 1).
    defects_per_product : int
        How many of them carry one defect (0 <= defects_per_product <= images_per_product).
    size : int
        Side S of the square (S, S, 3) uint8 photos, 64 <= S <= 512.

    Returns
    -------
    day : DemoDay
    """
    if not isinstance(images_per_product, int) or images_per_product < 1:
        raise ValueError(f"images_per_product must be a positive int, got {images_per_product!r}")
    if not isinstance(defects_per_product, int) or not 0 <= defects_per_product <= images_per_product:
        raise ValueError(
            f"defects_per_product must be in [0, images_per_product={images_per_product}], got {defects_per_product!r}"
        )
    if not isinstance(size, int) or not 64 <= size <= 512:
        raise ValueError(f"size must be an int in [64, 512], got {size!r}")
    input_dir = Path(root) / "input"
    ground_truth_dir = Path(root) / "ground_truth"
    images: list[DemoImage] = []
    for product_index, product in enumerate(PRODUCTS):
        # Separate streams per product and for photos vs defects: the clean photos do not
        # depend on how many defects are planted, so a defect-free day is the exact reference.
        photo_rng = np.random.default_rng([seed, product_index, 0])
        defect_rng = np.random.default_rng([seed, product_index, 1])
        source = _source(product)
        defective = set(defect_rng.choice(images_per_product, size=defects_per_product, replace=False).tolist())
        offset = int(defect_rng.integers(len(DEFECT_KINDS)))
        kinds = [DEFECT_KINDS[(i + offset) % len(DEFECT_KINDS)] for i in range(defects_per_product)]
        (input_dir / product).mkdir(parents=True, exist_ok=True)
        for index in range(images_per_product):
            photo = _photo(product, source, photo_rng, size)
            kind = kinds.pop() if index in defective else None
            images.append(_write_photo(photo, product, f"{index:03d}", input_dir, ground_truth_dir, kind, defect_rng))
    log.info("demo day: %d images (%d defective) in %s", len(images), sum(i.is_defective for i in images), input_dir)
    return DemoDay(input_dir=input_dir, ground_truth_dir=ground_truth_dir, images=tuple(images))


@dataclass(frozen=True)
class BadNight:
    """A night where one defect repeats at one place on many parts, and a clean golden set."""

    input_dir: Path  # input/<product>/NNN.png
    ground_truth_dir: Path  # ground_truth/<product>/NNN_mask.png for the defective images
    golden_dir: Path  # golden/<product>/gNNN.png: known-good photos, none of them in the night
    product: str
    images: tuple[DemoImage, ...]


def make_bad_night(
    root: str | os.PathLike,
    *,
    seed: int = 0,
    product: str = "brick",
    images: int = 12,
    repeated: int = 5,
    scattered: int = 0,
    golden: int = 6,
    kind: DefectKind = "stain",
    size: int = 112,
) -> BadNight:
    """Write a "bad night": ``repeated`` of ``images`` photos carry the same defect at the same place.

    A worn tool or a dirty lens does this: the defect is identical (same shape, place and
    colour) on every affected part, so mutual scoring finds it in other images of the night
    and calls it normal. ``golden`` more photos of the product, drawn from the same source
    but never part of the night, form the known-good reference folder ``golden/<product>/``.
    ``scattered`` other photos each get their own defect (kind, shape and place drawn per
    image), as on an ordinary night: ``repeated=0, scattered=3`` is an ordinary night.
    """
    if repeated < 0 or scattered < 0 or repeated + scattered > images:
        raise ValueError(f"need 0 <= repeated, scattered and repeated + scattered <= images={images}")
    if golden < 0:
        raise ValueError(f"golden must be >= 0, got {golden}")
    base = Path(root)
    input_dir, truth_dir, golden_dir = base / "input", base / "ground_truth", base / "golden"
    source = _source(product)
    photo_rng = np.random.default_rng([seed, 7, 0])
    order = np.random.default_rng([seed, 7, 1]).permutation(images).tolist()
    chosen, alone = set(order[:repeated]), order[repeated : repeated + scattered]
    (input_dir / product).mkdir(parents=True, exist_ok=True)
    (golden_dir / product).mkdir(parents=True, exist_ok=True)
    written = []
    for index in range(images):
        photo = _photo(product, source, photo_rng, size)
        planted, rng = None, None
        if index in chosen or index in alone:
            # the same generator state for every repeated part: the same defect at the same place
            rng = np.random.default_rng([seed, 7, 2] if index in chosen else [seed, 7, 3, index])
            planted = kind if index in chosen else DEFECT_KINDS[alone.index(index) % len(DEFECT_KINDS)]
        written.append(_write_photo(photo, product, f"{index:03d}", input_dir, truth_dir, planted, rng))
    for index in range(golden):
        photo = _photo(product, source, photo_rng, size)
        Image.fromarray(photo, mode="RGB").save(golden_dir / product / f"g{index:03d}.png", compress_level=1)
    return BadNight(input_dir, truth_dir, golden_dir, product, tuple(written))


def _write_photo(
    photo: np.ndarray,
    product: str,
    name: str,
    input_dir: Path,
    truth_dir: Path,
    kind: DefectKind | None,
    rng: np.random.Generator | None,
) -> DemoImage:
    """Save ``input_dir/<product>/<name>.png``, with a ``kind`` defect planted by ``rng`` and its mask if given."""
    path = input_dir / product / f"{name}.png"
    image = DemoImage(product, path, False, None, None)
    if kind is not None:
        photo, mask = _plant(photo, kind, rng)
        mask_path = truth_dir / product / f"{name}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.where(mask, 255, 0).astype(np.uint8), mode="L").save(mask_path)
        image = DemoImage(product, path, True, kind, mask_path)
    # Low zlib effort: these files are throwaway, and encoding dominated the run time.
    Image.fromarray(photo, mode="RGB").save(path, compress_level=1)
    return image


def _source(product: str) -> np.ndarray:
    """(h, w, 3) uint8 source image bundled with scikit-image (no download)."""
    pixels = {"brick": skdata.brick, "coffee": skdata.coffee, "gravel": skdata.gravel}[product]()
    if pixels.ndim == 2:
        pixels = np.repeat(pixels[..., None], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3], dtype=np.uint8)


def _photo(product: str, source: np.ndarray, rng: np.random.Generator, size: int) -> np.ndarray:
    """(S, S, 3) uint8 crop: random offset for textures, jittered fixed crop for the object."""
    if product == "coffee":
        top = _COFFEE_TOP + int(rng.integers(-_COFFEE_SHIFT, _COFFEE_SHIFT + 1))
        left = _COFFEE_LEFT + int(rng.integers(-_COFFEE_SHIFT, _COFFEE_SHIFT + 1))
        side = _COFFEE_SIDE
        gain = rng.uniform(0.9, 1.1)
    else:
        side = _TEXTURE_CROP
        top = int(rng.integers(0, source.shape[0] - side + 1))
        left = int(rng.integers(0, source.shape[1] - side + 1))
        gain = 1.0
    crop = source[top : top + side, left : left + side].astype(np.float64) * gain
    crop = np.clip(np.rint(crop), 0, 255).astype(np.uint8)
    return np.asarray(Image.fromarray(crop, mode="RGB").resize((size, size), Image.Resampling.BICUBIC))


def _plant(photo: np.ndarray, kind: DefectKind, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Blend one defect into photo; returns the (S, S, 3) uint8 result and the (S, S) bool change mask."""
    size = photo.shape[0]
    draw = {"scratch": _scratch, "stain": _stain, "missing": _missing}[kind]
    # Shapes are random; redraw the few that land outside the area range (same rng: deterministic).
    for _ in range(50):
        alpha, colour = draw(photo, rng)
        alpha = np.where(alpha < _ALPHA_FLOOR, 0.0, alpha)
        blended = photo * (1.0 - alpha[..., None]) + colour * alpha[..., None]
        result = np.clip(np.rint(blended), 0, 255).astype(np.uint8)
        mask = np.any(result != photo, axis=2)
        if _MIN_AREA <= mask.sum() / size**2 <= _MAX_AREA:
            return result, mask
    raise RuntimeError(f"could not plant a {kind} defect within the area range on a {size} px image")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float64)
    return rows, cols


def _rotated_frame(size: int, centre: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """(S, S) coordinates of every pixel along and across a shape's axes, from its centre."""
    rows, cols = _grid(size)
    d_row, d_col = rows - centre[0], cols - centre[1]
    return d_row * np.cos(angle) + d_col * np.sin(angle), -d_row * np.sin(angle) + d_col * np.cos(angle)


def _scratch(photo: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A thin curve (quadratic Bezier), anti-aliased by distance to its centre line."""
    size = photo.shape[0]
    half_width = max(1.5, size / 90)
    length = rng.uniform(0.45, 0.75) * size
    angle = rng.uniform(0, np.pi)
    direction = np.array([np.sin(angle), np.cos(angle)])
    centre = rng.uniform(0.3, 0.7, size=2) * size
    start, end = centre - direction * length / 2, centre + direction * length / 2
    bend = centre + np.array([-direction[1], direction[0]]) * rng.uniform(-0.25, 0.25) * length
    t = np.linspace(0.0, 1.0, int(length))[:, None]
    curve = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t**2 * end  # (P, 2) row, col
    rows, cols = _grid(size)
    distance = np.full((size, size), np.inf)
    for row, col in curve:
        distance = np.minimum(distance, np.hypot(rows - row, cols - col))
    alpha = np.clip(half_width + 0.5 - distance, 0.0, 1.0)
    # Bright on dark parts, dark on bright ones, so the line always stands out.
    colour = np.array([10.0, 10.0, 10.0]) if _local_mean(photo, alpha).mean() > 110 else np.array([245.0, 245.0, 235.0])
    return alpha, colour


def _stain(photo: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A wobbly ellipse of colour, opaque inside and fading over a few pixels at the rim."""
    size = photo.shape[0]
    area = rng.uniform(0.015, 0.035) * size**2
    aspect = rng.uniform(0.6, 1.0)
    radius_a = np.sqrt(area / (np.pi * aspect))
    radius_b = radius_a * aspect
    centre = rng.uniform(0.3, 0.7, size=2) * size
    angle = rng.uniform(0, np.pi)
    u, v = _rotated_frame(size, centre, angle)
    theta = np.arctan2(v, u)
    phases = rng.uniform(0, 2 * np.pi, size=3)
    wobble = 1 + 0.12 * sum(np.sin(k * theta + phase) for k, phase in zip((2, 3, 5), phases))
    # Radial position in pixels relative to the rim (negative inside).
    radial = (np.hypot(u / radius_a, v / radius_b) - wobble) * radius_b
    soft = max(2.0, size / 75)
    alpha = 0.85 * np.clip(0.5 - radial / soft, 0.0, 1.0)
    palette = np.array([[160, 45, 25], [35, 80, 190], [30, 150, 60], [215, 180, 20]], dtype=np.float64)
    mean = _local_mean(photo, alpha)
    colour = palette[np.argmax(np.linalg.norm(palette - mean, axis=1))]
    return alpha, colour


def _missing(photo: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A rotated rectangle of flat dark background with a hard edge."""
    size = photo.shape[0]
    area = rng.uniform(0.015, 0.04) * size**2
    aspect = rng.uniform(0.5, 1.0)
    half_long = np.sqrt(area / aspect) / 2
    half_short = half_long * aspect
    centre = rng.uniform(0.3, 0.7, size=2) * size
    angle = rng.uniform(0, np.pi)
    u, v = _rotated_frame(size, centre, angle)
    alpha = ((np.abs(u) <= half_long) & (np.abs(v) <= half_short)).astype(np.float64)
    return alpha, np.array([12.0, 12.0, 14.0])


def _local_mean(photo: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(3,) float64 mean colour under the defect footprint."""
    footprint = alpha > 0
    if not footprint.any():
        return photo.reshape(-1, 3).mean(axis=0, dtype=np.float64)
    return photo[footprint].mean(axis=0, dtype=np.float64)
